"""The pieces of autoregressive generation: the decode step, and the choice of the next token (the loop that runs
them is scheduler.py).

The sampling rules are small pure functions on logits [B, V], applied in the order transformers applies them
(repetition penalty, temperature, top-k, top-p, min-p), so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llama.arguments import check_all
from llama.model import Joining, Transformer


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens, without the prompt (and without the stop token)
    text: str | None  # None when there is no tokenizer
    finish_reason: str  # "stop" (an end-of-sequence token or stop string) or "length" (max_new_tokens reached)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        """A ValueError naming the first field out of its range (the ranges, shared with the command line's flags,
        are in llama/arguments.py)."""
        check_all(asdict(self))


# ---------------------------------------------------------------------------- sampling rules
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """CTRL's rule (as transformers): a token already in the sequence has its logit divided by `penalty` if
    positive, multiplied if negative. seen: [B, V] bool; penalty a number or one per row [B, 1]."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    return logits.masked_fill(logits < kth_largest(logits, k), float("-inf"))


def apply_top_p(logits: Tensor, p: float | Tensor) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least p (a number, or
    one per row [B, 1])."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float | Tensor) -> Tensor:
    """Drop tokens less likely than min_p times the most likely token (min_p a number, or one per row [B, 1])."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, seen: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] (float32) -> next tokens [B], every row with the same parameters, without a host
    synchronisation."""
    race = exponential_race(logits.shape, logits.device, generator) if params.temperature > 0 else None
    return sample_rows(logits, RowParams.of([params] * logits.shape[0], logits.device), seen, race)


@dataclass
class RowParams:
    """Each row's sampling parameters, as tensors [B, 1]: the rows of a continuous batch are different requests.
    A rule no row asks for is skipped (the flags are read on the host, so skipping costs no synchronisation)."""

    temperature: Tensor  # [B, 1] float32; 0: greedy
    top_k: Tensor  # [B, 1] long; rows without top-k hold the largest k asked for (and are not masked)
    top_p: Tensor  # [B, 1] float32
    min_p: Tensor  # [B, 1] float32
    repetition_penalty: Tensor  # [B, 1] float32
    largest_k: int | None  # the largest top-k of any row (None: no row has one)
    uses: frozenset[str]  # the rules some row asks for: "sampling", "top_k", "top_p", "min_p", "penalty"

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device) -> RowParams:
        ks = [p.top_k for p in params if p.top_k is not None]
        largest_k = max(ks) if ks else None

        def column(values: list, dtype: torch.dtype = torch.float32) -> Tensor:
            return to_device(torch.tensor(values, dtype=dtype).view(-1, 1), device)

        uses = {name for name, used in (("sampling", any(p.temperature > 0 for p in params)),
                                        ("top_k", largest_k is not None),
                                        ("top_p", any(p.top_p < 1 for p in params)),
                                        ("min_p", any(p.min_p > 0 for p in params)),
                                        ("penalty", any(p.repetition_penalty != 1 for p in params))) if used}
        return cls(column([p.temperature for p in params]),
                   column([p.top_k or -(largest_k or 0) for p in params], torch.long),
                   column([p.top_p for p in params]), column([p.min_p for p in params]),
                   column([p.repetition_penalty for p in params]), largest_k, frozenset(uses))

    def repeat_interleave(self, n: int) -> RowParams:
        """Each row's parameters n times over, [B * n, 1]: for n positions of each row ([B, n, V] logits viewed as
        [B * n, V])."""
        return RowParams(*(t.repeat_interleave(n, dim=0) for t in (self.temperature, self.top_k, self.top_p,
                                                                    self.min_p, self.repetition_penalty)),
                         self.largest_k, self.uses)


def sample_rows(logits: Tensor, rows: RowParams, seen: Tensor | None, race: Tensor | None) -> Tensor:
    """logits [B, V] (float32), each row with its own parameters -> next tokens [B]. `race` [B, V] holds the
    random draws of the sampled rows (`exponential_race`; None when every row is greedy)."""
    greedy, probs = _rules_applied(logits, rows, seen, race is not None)
    if probs is None:
        return greedy
    # argmax(p_i / E_i) with E_i ~ Exp(1) draws index i with probability p_i (the "exponential race"); unlike
    # torch.multinomial it needs no host synchronisation on a GPU.
    return torch.where(rows.temperature[:, 0] > 0, argmax(probs / race), greedy)


def distributions(logits: Tensor, rows: RowParams, seen: Tensor | None) -> Tensor:
    """The distribution `sample_rows` draws each row's token from, [B, V] float32: the softmax after the rules
    for a sampled row, all the mass on the argmax for a greedy one (speculative.py accepts or rejects proposed
    tokens against it)."""
    greedy, probs = _rules_applied(logits, rows, seen, True)
    one_hot = F.one_hot(greedy, logits.shape[-1]).to(logits.dtype)
    return one_hot if probs is None else torch.where(rows.temperature > 0, probs, one_hot)


def _rules_applied(logits: Tensor, rows: RowParams, seen: Tensor | None,
                   sampling: bool) -> tuple[Tensor, Tensor | None]:
    """-> (the greedy choice [B], the sampled rows' distributions [B, V] or None when no row samples)."""
    if "penalty" in rows.uses and seen is not None:
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
    greedy = argmax(logits)
    if not sampling or "sampling" not in rows.uses:
        return greedy, None
    sampled = rows.temperature > 0  # [B, 1]
    logits = logits / torch.where(sampled, rows.temperature, 1.0)
    if "top_k" in rows.uses:  # (a row without top-k holds -largest_k: kept whole)
        kth = torch.topk(logits, min(rows.largest_k, logits.shape[-1]), dim=-1).values  # [B, k] descending
        kth = kth.gather(-1, rows.top_k.abs().clamp(max=kth.shape[-1]) - 1)  # [B, 1]
        logits = logits.masked_fill((logits < kth) & (rows.top_k > 0), float("-inf"))
    if "top_p" in rows.uses:
        logits = apply_top_p(logits, rows.top_p)
    if "min_p" in rows.uses:
        logits = apply_min_p(logits, rows.min_p)
    return greedy, logits.softmax(dim=-1)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the device: through pinned memory to a GPU (a copy from
    pageable memory may wait for the work queued before it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def exponential_race(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
                     out: Tensor | None = None) -> Tensor:
    """Independent Exp(1) draws, float32: the randomness of one sampling step (into `out` where given)."""
    return (torch.empty(shape, device=device) if out is None else out).exponential_(1, generator=generator)


def argmax(x: Tensor) -> Tensor:
    """x [B, V] -> index of each row's largest value [B] (the first of equals), as `x.argmax(-1)`, in two stages:
    the row cut into 128 chunks reduced side by side, then the chunks' winners. Reduced in one piece, a row of
    128,256 logits is one block's work on a GPU (18 us on an H100 even inside the compiled step)."""
    B, V = x.shape
    chunks = 128
    width = -(-V // chunks)
    x = F.pad(x, (0, chunks * width - V), value=float("-inf"))
    best, where = x.view(B, chunks, width).max(dim=-1)  # [B, chunks] each
    chunk = best.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (chunk * width + where.gather(-1, chunk))[:, 0]


def kth_largest(logits: Tensor, k: Tensor | int) -> Tensor:
    """The k-th largest logit of each row, [B, 1] (kernels.kth_largest: the same for a compiled GPU step, but -inf
    for k >= V, which masks nothing either)."""
    return torch.topk(logits, min(int(k), logits.shape[-1]), dim=-1, sorted=False).values.amin(-1, keepdim=True)


def pick(logits: Tensor, race: Tensor | None, temperature: Tensor | None, top_k: Tensor | int | None,
         kth: Callable[[Tensor, Tensor | int], Tensor] = kth_largest) -> Tensor:
    """`sample_rows` for the common cases, written to run inside the compiled decode step: greedy when `race` is
    None, else temperature and top-k. logits [B, V] (model dtype), race [B, V] from `exponential_race`,
    temperature [B, 1] or 0-d, top_k [B] or a number (tensors, so that new values do not recompile the step)
    -> next tokens [B].

    The same draw as `sample_rows` from the same race: softmax(l / T) restricted to the top k is
    p_i = e^(l_i / T) / Z on the kept tokens, and argmax p_i / E_i = argmax (l_i / T - log E_i)
    = argmax (l_i - T log E_i). Dividing by T > 0 keeps the order of the logits, so the top k are taken from the
    logits as they come (bf16 on the GPU: half the radix passes of float32). A row with T = 0 is greedy (the
    compiled GPU step uses that to serve greedy and sampled rows with one graph)."""
    if race is None:
        return argmax(logits)
    scores = logits.float() - temperature * race.log()  # [B, V]
    scores = torch.where(temperature > 0, scores, logits.float())  # (0 * log 0 would be NaN)
    if top_k is not None:
        scores = scores.masked_fill(logits < kth(logits, top_k), float("-inf"))
    return argmax(scores)


# ---------------------------------------------------------------------------- the loop
def decode_step(model: Transformer, token: Tensor, position: Tensor, in_step: bool = False,
                race: Tensor | None = None, temperature: Tensor | None = None, top_k: Tensor | int | None = None,
                kth: Callable[[Tensor, Tensor | int], Tensor] = kth_largest, span: int | None = None,
                joining: Joining | None = None, advance: Tensor | None = None) -> Tensor:
    """One token per row: token [B, 1] at position [B, 1] -> logits [B, V], or with `in_step` the next token [B]
    chosen by `pick`; the step reads the first `span` cache slots (`Transformer.forward`). The unit
    `compile=True` compiles into one CUDA graph (api.CompiledDecodeStep): the choice is then inside the graph,
    next to the logits; eagerly, the sampler's softmax, top-k and argmax over 128,256 logits took ~0.2 ms per
    token on an H100. With `joining`, n prompts are prefilled in the same pass (model.Joining), and their first
    tokens follow the rows': logits [B + n, V] or tokens [B + n] (race, temperature and top-k then cover all).

    With `in_step` and `advance` [B, 1] (1 for a row that moves on, 0 for one that stays), the step also writes
    the tokens chosen into `token` and adds `advance` to `position`, in place: the next step's inputs, made inside
    the CUDA graph rather than by two more kernels between graphs (scheduler.RowState)."""
    logits = model(token, input_pos=position, span=span, joining=joining)
    logits = logits if joining is not None else logits[:, -1]
    if not in_step:
        return logits
    chosen = pick(logits, race, temperature, top_k, kth)
    if advance is not None:
        token.copy_(chosen[:token.shape[0], None])
        position.add_(advance)
    return chosen


def verify_step(model: Transformer, tokens: Tensor, positions: Tensor, span: int, choose: bool = False) -> Tensor:
    """T tokens per row, continuing each row's cache: tokens [B, T] at positions [B, T] -> logits [B, T, V], or
    with `choose` each position's argmax [B, T] (the speculative verify step, speculative.py; compiled into a CUDA
    graph of its own by api.CompiledDecodeStep, the greedy choice inside it, as the decode step's)."""
    logits = model(tokens, input_pos=positions, span=span)
    return argmax(logits.flatten(0, 1)).view(tokens.shape) if choose else logits


def prefill_step(model: Transformer, tokens: Tensor, logits_at: Tensor, rows: Tensor) -> Tensor:
    """Prompts tokens [n, T] (right-padded, from position 0) into cache rows [n] -> logits [n, V] at each prompt's
    last token, logits_at [n] (the compiled GPU path replays it from a CUDA graph, api.PrefillGraphs)."""
    return model(tokens, input_pos=torch.arange(tokens.shape[1], device=tokens.device), logits_at=logits_at,
                 rows=rows)
