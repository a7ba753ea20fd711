"""The Python API: `Llama.from_pretrained(folder)` -> logits and generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from llama.config import ModelConfig
from llama.generate import GenerationResult, SamplingParams, generate_ids
from llama.model import Transformer
from llama.weights import find_checkpoint, load_model


def default_device_and_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[
        torch.device, torch.dtype]:
    """cuda + bfloat16 when a GPU is present, else cpu + float32; either may be given explicitly."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r}: choose from {', '.join(names)}")
        dtype = names[dtype]
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


class Llama:
    """A loaded model, its config, and its tokenizer (None when the folder has no tokenizer files)."""

    def __init__(self, model: Transformer, tokenizer=None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len or self.config.max_position_embeddings,
                               self.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self._cache_shape: tuple[int, int] | None = None  # (batch, length) of the allocated KV cache

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int | None = None,
        progress: bool = True,
    ) -> Llama:
        """Load a checkpoint folder: Hugging Face layout (config.json + safetensors) or Meta's (params.json +
        consolidated.NN.pth, at the root or in `original/`)."""
        device, dtype = default_device_and_dtype(device, dtype)
        _, model = load_model(source, device, dtype, progress=progress)
        return cls(model, _load_tokenizer(source), max_seq_len, max_batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def logits(self, tokens: Tensor | Sequence[Sequence[int]]) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, V]: one full causal forward, no cache."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        self._release_cache()
        return self.model(tokens).float()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """Generate a continuation of each prompt (token-id lists), batched. Greedy at temperature 0."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        params.validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompts = [list(p) for p in prompts]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(prompt) + max_new_tokens} positions, more than max_seq_len={self.max_seq_len}"
                )
        stop = list(stop_token_ids or []) + list(self.config.eos_token_ids)
        self._ensure_cache(len(prompts), max(map(len, prompts)) + max_new_tokens)
        results = generate_ids(self.model, prompts, max_new_tokens, params, stop, seed)
        return [
            GenerationResult(ids, self.tokenizer.decode(ids) if self.tokenizer else None, reason)
            for ids, reason in results
        ]

    def _ensure_cache(self, batch: int, length: int) -> None:
        """Allocate the static KV cache, growing it only when a call needs more rows or positions."""
        if self._cache_shape and batch <= self._cache_shape[0] and length <= self._cache_shape[1]:
            return
        batch = max(batch, self.max_batch_size or 0, self._cache_shape[0] if self._cache_shape else 0)
        length = min(self.max_seq_len, max(length, self._cache_shape[1] if self._cache_shape else 0))
        self.model.setup_cache(batch, length)
        self._cache_shape = (batch, length)

    def _release_cache(self) -> None:
        self.model.clear_cache()
        self._cache_shape = None


def _load_tokenizer(source: str | Path):
    """The tokenizer for a checkpoint folder, or None when it has none."""
    try:
        from llama.tokenizer import load_tokenizer
    except ImportError:  # the tokenizer module is optional for the core engine
        return None
    _, folder = find_checkpoint(source)
    return load_tokenizer(Path(source)) or load_tokenizer(folder)
