"""Autoregressive generation: prefill the prompts, then one token per step from a static KV cache.

The sampling rules are small pure functions on logits [B, V], applied in the order transformers applies them
(repetition penalty, temperature, top-k, top-p, min-p), so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


# ---------------------------------------------------------------------------- sampling rules
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's rule (as transformers): a token already in the sequence has its logit divided by `penalty` if
    positive, multiplied if negative. seen: [B, V] bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


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
        return logits.argmax(dim=-1)
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
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


# ---------------------------------------------------------------------------- the loop
def decode_step(model: Transformer, token: Tensor, position: Tensor, greedy: bool = False) -> Tensor:
    """One token per row: token [B, 1] at position [B, 1] -> logits [B, V], or with `greedy` the most likely next
    token [B]. The unit `compile=True` compiles: greedy, the argmax is then inside the CUDA graph, where it is a
    split reduction of a few microseconds (eagerly, one block reduces the 128,256 logits of Llama 3 in 28 us)."""
    logits = model(token, input_pos=position)[:, -1]
    return logits.argmax(dim=-1) if greedy else logits


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    decode: Callable[[Transformer, Tensor, Tensor, bool], Tensor] = decode_step,
) -> Iterator[Tensor]:
    """Yield the next token of every row, [B] on the model's device, once per step; stop iterating to stop.

    Prompts of different lengths share one batch: they are right-padded for the prefill (a padded position never
    influences earlier ones under causal attention) and each row then decodes from its own position, so every
    row equals generating its prompt alone. The KV cache must already hold max(len) + max_new_tokens positions.
    Nothing here waits for the GPU: whether to stop is the caller's decision.
    """
    device = model.embed_tokens.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    tokens = torch.zeros(B, max(len(p) for p in prompts), dtype=torch.long)
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
    greedy = params.temperature == 0 and seen is None  # then the decode step picks the token itself (argmax)
    next_token = sample(logits.float(), params, seen, generator)  # [B]
    for step in range(max_new_tokens):
        if seen is not None:
            seen[rows, next_token] = True
        yield next_token
        if step == max_new_tokens - 1:
            return
        out = decode(model, next_token[:, None], position[:, None], greedy)  # greedy: [B] tokens, else [B, V]
        position += 1
        # (a CUDA graph's output is overwritten by its next replay: keep a copy of the tokens)
        next_token = out.clone() if greedy else sample(out.float(), params, seen, generator)
