"""Perplexity of a text, the quality instrument for quantized weights (`Llama.perplexity`, `llama perplexity`).

The definition, so that anyone can reproduce a figure with transformers:
  1. encode the whole text without special tokens;
  2. cut it into consecutive windows of `context` tokens, or of `context - 1` tokens when the tokenizer adds a BOS,
     which then starts each window;
  3. run each window alone, from an empty cache;
  4. score every text token that has a token before it in its window: nll = -log p(token | what precedes it);
  5. perplexity = exp(mean nll). A last window with nothing to score is dropped.

Against a reference model (the same checkpoint unquantized, say) it also reports, over the same scored positions,
the mean KL divergence KL(reference || model) and how often both rank the same token first, as llama.cpp's
perplexity tool does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from llama.api import Llama

TOKENS_PER_FORWARD = 4096  # windows are run several at a time, up to this many tokens


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens
    seconds: float
    kl_divergence: float | None = None  # mean KL(reference || model) per scored token, in nats
    top1_agreement: float | None = None  # share of scored tokens where both models rank the same token first

    def summary(self) -> str:
        line = f"perplexity: {self.perplexity:.4f}\nscored {self.tokens} tokens in {self.seconds:.1f} s"
        if self.kl_divergence is not None:
            line += (f"\nKL divergence from the reference: {self.kl_divergence:.6f} nats/token; "
                     f"same top token: {self.top1_agreement:.2%}")
        return line


def windows(ids: Sequence[int], context: int, bos_id: int | None) -> list[list[int]]:
    """The text's token ids cut into the windows the definition runs, BOS first when given; windows with nothing
    to score (one token and no BOS) are dropped."""
    step = context - 1 if bos_id is not None else context
    prefix = [bos_id] if bos_id is not None else []
    chunks = [prefix + list(ids[i:i + step]) for i in range(0, len(ids), step)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


@torch.inference_mode()
def perplexity(llm: Llama, text: str, context: int = 512, reference: Llama | None = None,
               progress: bool = False) -> PerplexityResult:
    if llm.tokenizer is None:
        raise ValueError("perplexity needs a tokenizer, and this checkpoint folder has none")
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2, got {context!r}")
    if context > llm.max_seq_len:
        raise ValueError(f"context={context} is more than max_seq_len={llm.max_seq_len}")
    if reference is not None and reference.config.vocab_size != llm.config.vocab_size:
        raise ValueError("the reference model has a different vocabulary")
    tokenizer = llm.tokenizer
    chunks = windows(tokenizer.encode(text, bos=False), context, tokenizer.bos_id if tokenizer.adds_bos else None)
    if not chunks:
        raise ValueError("the text has too few tokens to score any (it needs at least 2)")

    start = time.perf_counter()
    nll, kl, same, scored = 0.0, 0.0, 0, 0
    per_forward = max(1, TOKENS_PER_FORWARD // context)
    bar = tqdm(total=sum(len(c) - 1 for c in chunks), desc="perplexity", unit="tok", disable=not progress,
               leave=False)
    for first in range(0, len(chunks), per_forward):
        batch = chunks[first:first + per_forward]
        # Only the last window can be shorter; each length is run as its own batch (no padding to reason about).
        for group in ([c for c in batch if len(c) == n] for n in sorted({len(c) for c in batch})):
            tokens = torch.tensor(group, device=llm.device)  # [B, T]
            logprobs = llm.logits(tokens)[:, :-1].log_softmax(dim=-1)  # [B, T-1, V]: predictions of tokens 1..T-1
            targets = tokens[:, 1:]
            nll -= logprobs.gather(-1, targets[..., None]).sum().item()
            scored += targets.numel()
            if reference is not None:
                reference_logprobs = reference.logits(tokens.to(reference.device))[:, :-1].log_softmax(-1)
                reference_logprobs = reference_logprobs.to(logprobs.device)
                kl += (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum().item()
                same += (reference_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item()
            bar.update(targets.numel())
    bar.close()
    result = PerplexityResult(math.exp(nll / scored), scored, time.perf_counter() - start)
    if reference is not None:
        result.kl_divergence, result.top1_agreement = kl / scored, same / scored
    return result
