"""Autoregressive generation: prefill the prompts, then one token per step from a static KV cache.

The sampling rules are small pure functions on logits [B, V], applied in the order transformers applies them
(repetition penalty, temperature, top-k, top-p, min-p), so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llama.arguments import check_all
from llama.model import Transformer


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
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's rule (as transformers): a token already in the sequence has its logit divided by `penalty` if
    positive, multiplied if negative. seen: [B, V] bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    return logits.masked_fill(logits < kth_largest(logits, k), float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens less likely than min_p times the most likely token."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, seen: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] (float32) -> next tokens [B], without a host synchronisation."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return argmax(logits)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    # argmax(p_i / E_i) with E_i ~ Exp(1) draws index i with probability p_i (the "exponential race"); unlike
    # torch.multinomial it needs no host synchronisation on a GPU.
    return argmax(probs / exponential_race(probs.shape, probs.device, generator))


def exponential_race(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Independent Exp(1) draws, float32: the randomness of one sampling step."""
    return torch.empty(shape, device=device).exponential_(1, generator=generator)


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
    """The k-th largest logit of each row, [B, 1] (kernels.kth_largest: the same, for a compiled GPU step)."""
    return torch.topk(logits, min(int(k), logits.shape[-1]), dim=-1, sorted=False).values.amin(-1, keepdim=True)


def pick(logits: Tensor, race: Tensor | None, temperature: Tensor | None, top_k: Tensor | int | None,
         kth: Callable[[Tensor, Tensor | int], Tensor] = kth_largest) -> Tensor:
    """`sample` for the common cases, written to run inside the compiled decode step: greedy when `race` is None,
    else temperature and top-k. logits [B, V] (model dtype), race [B, V] from `exponential_race`, temperature a
    0-d tensor (a tensor, so that a new value does not recompile the step) -> next tokens [B].

    The same draw as `sample` from the same race: softmax(l / T) restricted to the top k is p_i = e^(l_i / T) / Z
    on the kept tokens, and argmax p_i / E_i = argmax (l_i / T - log E_i) = argmax (l_i - T log E_i). Dividing by
    T > 0 keeps the order of the logits, so the top k are taken from the logits as they come (bf16 on the GPU:
    half the radix passes of float32). With T = 0 and E = 1 it is greedy again (the compiled GPU step uses that
    to serve both with one graph)."""
    if race is None:
        return argmax(logits)
    scores = logits.float() - temperature * race.log()  # [B, V]
    if top_k is not None:
        scores = scores.masked_fill(logits < kth(logits, top_k), float("-inf"))
    return argmax(scores)


def picks_in_step(params: SamplingParams, seen: Tensor | None) -> bool:
    """Whether `pick` can choose the tokens inside the decode step (else the step returns logits for `sample`)."""
    return seen is None and params.top_p == 1.0 and params.min_p == 0.0


# ---------------------------------------------------------------------------- the loop
def decode_step(model: Transformer, token: Tensor, position: Tensor, in_step: bool = False,
                race: Tensor | None = None, temperature: Tensor | None = None, top_k: Tensor | int | None = None,
                kth: Callable[[Tensor, Tensor | int], Tensor] = kth_largest, span: int | None = None) -> Tensor:
    """One token per row: token [B, 1] at position [B, 1] -> logits [B, V], or with `in_step` the next token [B]
    chosen by `pick`; the step reads the first `span` cache slots (`Transformer.forward`). The unit
    `compile=True` compiles into one CUDA graph (api.CompiledDecodeStep): the choice is then inside the graph,
    next to the logits; eagerly, the sampler's softmax, top-k and argmax over 128,256 logits took ~0.2 ms per
    token on an H100."""
    logits = model(token, input_pos=position, span=span)[:, -1]
    return pick(logits, race, temperature, top_k, kth) if in_step else logits


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    decode: Callable[..., Tensor] = decode_step,
) -> Iterator[Tensor]:
    """Yield the next token of every row, [B] on the model's device, once per step; stop iterating to stop.

    Prompts of different lengths share one batch: they are right-padded for the prefill (a padded position never
    influences earlier ones under causal attention) and each row then decodes from its own position, so every
    row equals generating its prompt alone. The KV cache must already hold max(len) + max_new_tokens positions.
    Nothing here waits for the GPU: whether to stop is the caller's decision. Each decode step is told how many
    cache slots are in use (`span`), counted here on the host, so that it reads those and not the whole cache.
    """
    device = model.embed_tokens.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(B, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    tokens = tokens.to(device)  # [B, T]
    seen = None
    if params.repetition_penalty != 1.0:  # which tokens each row has seen, prompt included (as transformers)
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True

    logits = model(tokens, input_pos=torch.arange(tokens.shape[1], device=device), logits_at=lengths - 1)  # [B, V]
    position = lengths.clone()  # [B]: where each row's next token goes
    rows = torch.arange(B, device=device)
    in_step = picks_in_step(params, seen)  # then the decode step chooses the token itself
    temperature = torch.tensor(params.temperature, device=device) if params.temperature > 0 else None
    next_token = sample(logits.float(), params, seen, generator)  # [B]
    for step in range(max_new_tokens):
        if seen is not None:
            seen[rows, next_token] = True
        yield next_token
        if step == max_new_tokens - 1:
            return
        span = longest + step + 1  # slots in use once this step has written its token (at lengths + step)
        if in_step:
            race = None if temperature is None else exponential_race((B, logits.shape[-1]), device, generator)
            # (a CUDA graph's output is overwritten by its next replay: keep a copy of the tokens)
            next_token = decode(model, next_token[:, None], position[:, None], True, race, temperature,
                                params.top_k, span=span).clone()
        else:
            logits = decode(model, next_token[:, None], position[:, None], span=span)  # [B, V]
            next_token = sample(logits.float(), params, seen, generator)
        position += 1
