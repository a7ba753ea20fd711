"""Speculative decoding: propose a few tokens cheaply, check them all with one forward pass of the model.

At batch 1 a decode step reads every weight to produce one token. A verify step runs the row's latest token and
k proposed tokens d_1..d_k through the model at once (`Transformer.forward` with T = k + 1 and a span: each token
sees the cache up to its own position), which reads the weights once too, and gives the model's distribution
p_0..p_k after each of them. The proposals are then accepted from the left (`accept`):

    greedy:   d_j is kept while it is the model's own choice, argmax p_(j-1); the first token that is not is
              replaced by that argmax, and if all k are kept, argmax p_k comes free. Token for token plain greedy.
    sampling: (Leviathan et al. 2023; Chen et al. 2023) d_j, proposed with probability q_(j-1)(d_j), is kept with
              probability min(1, p(d_j) / q(d_j)); at the first rejection the token is drawn from the leftover
              max(0, p - q), normalised; if all k are kept, one more is drawn from p_k. Every token then has the
              model's distribution p, whatever q is: P(token = x) = min(p(x), q(x)) + (1 - sum min(p, q)) *
              max(0, p(x) - q(x)) / sum max(0, p - q) = p(x).

p and q are the distributions plain sampling draws from (`generate.distributions`: repetition penalty,
temperature, top-k, top-p, min-p, each row with its own; a greedy row's p puts all its mass on the argmax, which
turns the sampling rule into the greedy one). So each emitted run is 1 to k + 1 tokens, the same tokens as
without speculation in greedy (in float32 exactly, as far as a k + 1-token product rounds as a 1-token one), and
the same distribution when sampling. The cache entries written for rejected tokens lie past the row's position,
are never read (a step reads slots up to its own position), and are overwritten by the row's next step.

Two proposers:
    PromptLookup  the continuation of the latest earlier occurrence of the last n tokens (n = 3, 2, 1) in the
                  prompt and the answer so far (no second model; q is certain: q(d) = 1). It pays where the answer
                  copies its input: code edits, summaries, extraction.
    DraftModel    a small model with the same vocabulary (Llama 3.2 1B for Llama 3.1 8B), decoding k tokens in
                  its own cache; q is its distribution.

The loop that runs them is the scheduler's (scheduler.py, `Scheduler._speculate`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llama import cpu_kernels
from llama.generate import RowParams, argmax, decode_step, distributions, verify_step
from llama.model import Linear, Transformer

PROMPT_LOOKUP = "prompt-lookup"
DEFAULT_SPECULATIVE_TOKENS = 4


class PromptLookup:
    """Proposes, for a sequence s, what followed the latest earlier occurrence of its last n tokens: s[i+n:i+n+k]
    for the largest i with s[i:i+n] == s[-n:] and i + n < len(s), trying n = max_ngram first, down to min_ngram.

    The n-grams of each job's sequence are indexed as the sequence grows (a dict from n-gram to its latest start),
    so a step costs one lookup per n, not a scan of the prompt."""

    def __init__(self, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS, max_ngram: int = 3,
                 min_ngram: int = 1):
        self.k, self.max_ngram, self.min_ngram = num_speculative_tokens, max_ngram, min_ngram
        self._index: weakref.WeakKeyDictionary[object, _NgramIndex] = weakref.WeakKeyDictionary()

    def propose(self, owner: object, prompt: Sequence[int], generated: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to follow prompt + generated (fewer near the end of the match, none without one).
        `owner` (a scheduler job) keys the index of that sequence."""
        index = self._index.get(owner)
        if index is None:
            index = self._index[owner] = _NgramIndex(list(prompt), range(self.min_ngram, self.max_ngram + 1))
        index.extend(generated[len(index.tokens) - len(prompt):])
        return index.continuation(k) if k > 0 else []


class _NgramIndex:
    def __init__(self, tokens: list[int], sizes: range):
        self.tokens = tokens
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}  # n -> n-gram -> its start
        self.indexed = {n: 0 for n in sizes}  # n -> starts indexed so far

    def extend(self, new: Sequence[int]) -> None:
        self.tokens.extend(new)
        s = self.tokens
        for n, latest in self.latest.items():
            # index every n-gram with a token after it (the last n-gram itself is what we look up)
            for start in range(self.indexed[n], len(s) - n):
                latest[tuple(s[start:start + n])] = start
            self.indexed[n] = max(self.indexed[n], len(s) - n)

    def continuation(self, k: int) -> list[int]:
        s = self.tokens
        for n in sorted(self.latest, reverse=True):
            if len(s) <= n:
                continue
            start = self.latest[n].get(tuple(s[-n:]))
            if start is not None:
                return s[start + n: start + n + k]
        return []


class DraftModel:
    """A smaller model with the same vocabulary proposing k tokens by decoding them in its own KV cache, which has
    the target's rows and length. Its cache holds each row's prompt (`admit`) and its own proposals; a step first
    runs the row's two latest tokens (the one before was the draft's own proposal, or its correction, and the
    latest was never run by it), so that the cache is right up to the row's position whatever was accepted."""

    def __init__(self, model: Transformer, decode: Callable[..., Tensor] = decode_step,
                 num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS):
        self.model, self.decode, self.k = model, decode, num_speculative_tokens
        self.verify = getattr(decode, "verify", verify_step)  # (a compiled step brings its own)

    def admit(self, tokens: Tensor, lengths: Tensor, rows: Tensor) -> None:
        """Prefill the draft's cache rows with prompts (right-padded [n, T], as the scheduler prefills them)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        self.model(tokens, input_pos=positions, logits_at=lengths - 1, rows=rows)

    def propose(self, latest: Tensor, positions: Tensor, span: int, params: RowParams,
                races: Tensor | None) -> tuple[Tensor, Tensor]:
        """latest [B, 2]: each row's two latest tokens, at positions [B, 2] (the second: where the row's newest
        token goes); races [B, k, V] Exp(1) draws for the sampled rows (None: every row greedy)
        -> proposals [B, k], and their distributions q [B, k, V] (float32)."""
        length = self.model.layers[0].attention.cache.k.shape[2]
        logits = self.verify(self.model, latest, positions, span)[:, -1]  # [B, V]
        proposals, q = [], []
        for j in range(self.k):
            q.append(distributions(logits.float(), params, None))  # [B, V]
            proposals.append(argmax(q[-1] if races is None else q[-1] / races[:, j]))  # (greedy: q is one-hot)
            if j + 1 < self.k:
                position = (positions[:, -1:] + j + 1).clamp(max=length - 1)  # [B, 1]
                logits = self.decode(self.model, proposals[-1][:, None], position, span=span + j + 1)
        return torch.stack(proposals, dim=1), torch.stack(q, dim=1)


def accept(logits: Tensor, proposals: Tensor, counts: Tensor, q: Tensor | None, params: RowParams,
           seen: Tensor | None, uniform: Tensor, race: Tensor | None) -> tuple[Tensor, Tensor]:
    """The rule in the module's docstring, for a batch.

    logits [B, k+1, V] float32: the model's after the row's latest token and after each proposal
    proposals [B, k]; counts [B]: how many of each row's proposals count (fewer near max_new_tokens or without a
      match; the rest is padding)
    q [B, k, V]: the proposer's distributions, or None when the proposals are certain (prompt lookup)
    seen [B, V] bool: the tokens each row has seen (repetition penalty), or None
    uniform [B, k] draws in (0, 1]; race [B, V] Exp(1) draws for the last token (None: every row greedy)
    -> tokens [B, k+1] whose first `emitted[b]` are row b's new tokens, emitted [B] (1 to counts + 1)."""
    B, T, V = logits.shape
    k = T - 1
    if seen is not None:  # the token at position j has also seen the proposals before it
        seen = seen[:, None].repeat(1, T, 1)  # [B, T, V]
        for j in range(1, T):
            seen[:, j:].scatter_(-1, proposals[:, None, j - 1: j].expand(B, T - j, 1), True)
        seen = seen.view(B * T, V)
    p = distributions(logits.view(B * T, V), params.repeat_interleave(T), seen).view(B, T, V)
    p_proposed = p[:, :k].gather(-1, proposals[..., None])[..., 0]  # [B, k]
    q_proposed = 1.0 if q is None else q.gather(-1, proposals[..., None])[..., 0]
    kept = (uniform * q_proposed <= p_proposed) & (torch.arange(k, device=logits.device) < counts[:, None])
    accepted = kept.long().cumprod(dim=-1).sum(dim=-1)  # [B]: the leading run of kept proposals
    rows = torch.arange(B, device=logits.device)
    p_next = p[rows, accepted]  # [B, V]
    at = accepted.clamp(max=k - 1)
    q_next = F.one_hot(proposals[rows, at], V).to(p.dtype) if q is None else q[rows, at]
    rejected = (accepted < counts)[:, None]
    leftover = torch.where(rejected, (p_next - q_next).clamp(min=0), p_next)
    leftover = torch.where(leftover.sum(dim=-1, keepdim=True) > 0, leftover, p_next)  # (p == q, rounding)
    last = argmax(leftover if race is None else leftover / race)
    tokens = torch.cat([proposals, proposals[:, :1]], dim=1)
    tokens[rows, accepted] = last
    return tokens, accepted + 1


def pack_for_verify(model: Transformer) -> None:
    """On a CPU, give every `model.Linear` a product for the verify step's few rows: oneDNN's matmul with W
    prepacked into its blocked layout. For 5 rows of a layer's matrices it takes about what one row takes
    (SmolLM2's [3072, 576]: ~120 us against ~100 us), where torch's matmul (MKL) takes ~4x and Inductor's
    one-row sum, summed for 5 rows, ~4x (docs/benchmarks.md, "Speculative decoding"). Costs a second copy of
    the weights, made once, when speculation is first used. The product is called through cpu_kernels' C++ op
    (through `_packed_linear`, a Python custom op, where those cannot be built: ~23 us more a call). A no-op on
    a GPU, or where oneDNN is missing."""
    device = model.embed_tokens.weight.device
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return
    ops = cpu_kernels.ops()
    product = ops.packed_linear if ops is not None else _packed_linear
    for module in model.modules():
        if isinstance(module, Linear) and module.few_rows is None and module.weight.dtype in (torch.float32,
                                                                                                torch.bfloat16):
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), Linear.SMALL)
            module.few_rows = functools.partial(product, packed=packed, bias=module.bias,
                                                out_features=module.out_features)


@torch.library.custom_op("llamaref::packed_linear", mutates_args=())
def _packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x [..., in] @ W^T + b with W prepacked by oneDNN (an op of its own: Inductor lowers oneDNN's matmul only
    for weights frozen into the graph)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [None], "")
    return y.view(*x.shape[:-1], out_features)


@_packed_linear.register_fake
def _(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def acceptance(accepted: int, proposed: int) -> str:
    """How a run's speculation went, as the command line prints it (after generating, and when a server stops)."""
    return f"speculation: {accepted} of {proposed} proposed tokens accepted ({accepted / proposed:.0%})"


def check_draft(draft: object, target_vocab_size: int, target_tokenizer: object | None) -> None:
    """A draft model must speak the target's vocabulary: the same size, and the same ids for a probe text."""
    config, tokenizer = draft.config, draft.tokenizer
    if config.vocab_size != target_vocab_size:
        raise ValueError(f"draft: its vocabulary has {config.vocab_size} tokens, the model's {target_vocab_size}; "
                         f"a draft model must share the model's tokenizer")
    probe = "Speculative decoding: 12 drafts, 3.5 accepted; naïve café"
    if tokenizer is not None and target_tokenizer is not None \
            and tokenizer.encode(probe, bos=False) != target_tokenizer.encode(probe, bos=False):
        raise ValueError("draft: its tokenizer encodes text differently from the model's; a draft model must share "
                         "the model's tokenizer")
