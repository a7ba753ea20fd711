"""The Python API: `Llama.from_pretrained(folder)`, then `logits`, `generate` and `stream`."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llama.config import ModelConfig
from llama.generate import GenerationResult, SamplingParams, decode_step, generate_tokens
from llama.model import Transformer
from llama.quant import QuantizationConfig
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tp import TensorParallel, shared_seed
from llama.weights import find_checkpoint, load_model

Prompt = str | Sequence[int]
SYNC_EVERY = 8  # without streaming or stop strings, look at the generated tokens in blocks of 8 steps


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0

    def summary(self) -> str:
        prefill = self.prompt_tokens / max(self.prefill_seconds, 1e-9)
        decode = max(self.new_tokens - 1, 0) / max(self.decode_seconds, 1e-9)
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s ({prefill:.1f} tok/s); "
                f"decode: {self.new_tokens} tokens in {self.decode_seconds:.2f} s ({decode:.1f} tok/s)")


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


class CompiledDecodeStep:
    """The decode step as one CUDA graph (torch.compile "reduce-overhead"): it removes the per-kernel launch cost
    that dominates small-batch decoding. Compiles once per batch size and cache length (tens of seconds).

    On a GPU one graph serves every way of choosing the token: the choice's parameters go in as tensors (greedy
    is temperature 0 with a race of ones, no top-k is k = V), and the k-th largest logit comes from a kernel that
    takes k as a tensor (`kernels.kth_largest`). So greedy and sampling run the very same kernels, and a new
    temperature or top-k compiles nothing.

    Two global Inductor settings are switched on here only (docs/benchmarks.md has the Llama-3.1-8B batch-1
    figures on an H100): coordinate-descent tuning of Inductor's kernels (7.3 -> 6.5 ms a step), and programmatic
    dependent launch on Hopper and later GPUs, which lets each kernel start while the one before it finishes
    (each waits for its inputs inside; 5.84 -> 5.62 ms a step)."""

    def __init__(self):
        torch._inductor.config.coordinate_descent_tuning = True
        if hasattr(torch._inductor.config.triton, "enable_pdl"):  # (torch >= 2.10)
            torch._inductor.config.triton.enable_pdl = True
        self.step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
        self.constants: dict[tuple, Tensor] = {}

    def __call__(self, model: Transformer, token: Tensor, position: Tensor, in_step: bool = False,
                 race: Tensor | None = None, temperature: Tensor | None = None, top_k: int | None = None) -> Tensor:
        if not (in_step and token.is_cuda):
            return self.step(model, token, position, in_step, race, temperature, top_k)
        from llama.kernels import kth_largest  # (needs Triton, so only here)

        B, V = token.shape[0], model.lm_head.out_features
        if race is None:  # greedy
            race = self._constant(("ones", B, V), lambda: torch.ones(B, V, device=token.device))
            temperature = self._constant(("zero",), lambda: torch.zeros((), device=token.device))
        k = self._constant(("k", B, top_k or V), lambda: torch.full((B,), top_k or V, device=token.device))
        return self.step(model, token, position, True, race, temperature, k, kth_largest)

    def _constant(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        if key not in self.constants:
            self.constants[key] = make()
        return self.constants[key]


def compile_layers_for_prefill(model: Transformer) -> None:
    """The prefill cannot be one CUDA graph (its length changes from call to call), and eagerly its cost is
    launching ~1,400 kernels (a 128-token prompt: 36 ms on an H100 for 8B). Each layer is compiled instead, once,
    for every length (`dynamic=True`); the 32 layers share that compilation. Inside the compiled decode step the
    layers are traced like any other code."""
    for layer in model.layers:
        layer.compile(dynamic=True)


class Llama:
    """A loaded model, its config, and its tokenizer (None when the folder has no tokenizer files)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None, eos_token_ids: Sequence[int] = (), compile: bool = False,
                 config: ModelConfig | None = None):
        self.model = model  # under tensor parallelism, this rank's part (model.config: its local shape)
        self._decode_step = CompiledDecodeStep() if compile else decode_step
        if compile:
            compile_layers_for_prefill(model)
            if model.embed_tokens.weight.is_cuda:
                model.use_triton_kernels()
        self.config: ModelConfig = config or model.config  # the whole model's shape
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        limit = self.config.max_position_embeddings
        if max_seq_len is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}")
        self.max_seq_len = max_seq_len or min(limit, self._positions_that_fit())
        self.eos_token_ids = sorted(set(eos_token_ids) | set(self.config.eos_token_ids)
                                    | set(tokenizer.eos_ids if tokenizer else ()))
        self.stats = GenerationStats()  # of the last generate / stream call
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
        compile: bool = False,
        quantize: str | None = None,
        group_size: int | None = None,
    ) -> Llama:
        """Load a checkpoint folder: Hugging Face layout (config.json + safetensors) or Meta's (params.json +
        consolidated.NN.pth, at the root or in `original/`). Under torchrun (WORLD_SIZE > 1) the model is split
        over the ranks (tensor parallelism, see tp.py) and each rank loads only its part.

        quantize: "int8" (one scale per output channel) or "int4" (a scale and a minimum per `group_size` input
        features: 32, 64 (default), 128 or 256), weight-only, quantized on the device as each tensor is read
        (quant.py). A checkpoint written by `llama quantize` is loaded quantized without the argument."""
        quantization = QuantizationConfig.make(quantize, group_size)
        tensor_parallel = TensorParallel.from_environment()
        if tensor_parallel and device is None and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        device, dtype = default_device_and_dtype(device, dtype)
        _, folder = find_checkpoint(source)
        progress = progress and (tensor_parallel is None or tensor_parallel.rank == 0)
        config, model = load_model(folder, device, dtype, progress=progress, tensor_parallel=tensor_parallel,
                                   quantize=quantization)
        tokenizer = load_tokenizer(source) or load_tokenizer(folder)
        return cls(model, tokenizer, max_seq_len, max_batch_size, _generation_config_eos(Path(source)), compile,
                   config)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------ logits
    @torch.inference_mode()
    def logits(self, tokens: Tensor | Sequence[Sequence[int]]) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, V]: one full causal forward, no cache."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        self._release_cache()
        return self.model(tokens).float()

    def perplexity(self, text: str, context: int = 512) -> float:
        """exp(mean negative log-likelihood) of the text's tokens, scored in windows of `context` tokens, each run
        alone (the exact definition is in perplexity.py, which also compares against a reference model)."""
        from llama.perplexity import perplexity

        return perplexity(self, text, context).perplexity

    # ------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """Continue each prompt (a string or a list of token ids), in one batch; one result per prompt.

        Greedy at temperature 0; otherwise the sampling options mean what transformers means by them. Generation
        of a row stops at any end-of-sequence id of the checkpoint, at `stop_token_ids`, or when its text contains
        one of the `stop` strings (the text is cut before it); `.token_ids` never include the stop token.
        """
        batch = _as_batch(prompts)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        rows: list[_Row] = []
        for rows, _ in self._run(batch, max_new_tokens, params, seed, stop, stop_token_ids, streaming=False):
            pass
        return [row.result() for row in rows]

    def stream(self, prompt: Prompt, **options) -> Iterator[str]:
        """Like `generate` for one prompt, yielding the text as it is decoded (never half a character)."""
        if not isinstance(prompt, str) and prompt and not isinstance(prompt[0], int):
            raise ValueError("stream takes one prompt (a string or a list of token ids)")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer, and this checkpoint folder has none")
        options.setdefault("max_new_tokens", 256)
        max_new_tokens = options.pop("max_new_tokens")
        seed, stop, stop_ids = options.pop("seed", None), options.pop("stop", None), options.pop("stop_token_ids", None)
        params = SamplingParams(**options)
        for _, pieces in self._run([prompt], max_new_tokens, params, seed, stop, stop_ids, streaming=True):
            if pieces[0]:
                yield pieces[0]

    def _run(self, prompts: list[Prompt], max_new_tokens: int, params: SamplingParams, seed: int | None,
             stop: Sequence[str] | None, stop_token_ids: Sequence[int] | None,
             streaming: bool) -> Iterator[tuple[list[_Row], list[str]]]:
        """The shared loop: validate, batch, decode; yields the rows and the new text of each at every look."""
        params.validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint folder has none")
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, prompt in enumerate(ids):
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(prompt) + max_new_tokens} positions, more than max_seq_len={self.max_seq_len}"
                )
        self._ensure_cache(len(ids), max(map(len, ids)) + max_new_tokens)
        stop_ids = set(stop_token_ids or ()) | set(self.eos_token_ids)
        rows = [_Row(self.tokenizer, stop_ids, list(stop or ())) for _ in ids]
        generator = None
        seed = shared_seed(seed)  # under tensor parallelism every rank must draw the same tokens
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        self.stats = GenerationStats(prompt_tokens=sum(map(len, ids)))
        start = time.perf_counter()
        pending: list[Tensor] = []
        copies: deque[Callable[[], list[list[int]]]] = deque()  # blocks of tokens on their way to the host
        done = False
        steps = _out_of_memory_explained(generate_tokens(self.model, ids, max_new_tokens, params, generator,
                                                         self._decode_step), len(ids), max(map(len, ids)))
        for step, token in enumerate(steps):
            pending.append(token)
            last = step == max_new_tokens - 1
            if not (streaming or stop or step == 0 or last or len(pending) == SYNC_EVERY):
                continue
            copies.append(_copy_to_host(torch.stack(pending, dim=1)))  # [B, steps]
            pending = []
            # Read the block before this one: the GPU is already past it and has this block's steps queued, so it
            # never waits for the host (reading the newest block left it idle ~1.8 ms per read on an H100 while
            # the next step was launched). The first token and the last block are read at once. A stop is thus
            # seen up to two blocks after it happens; the steps decoded past it are dropped.
            while copies and (len(copies) > 1 or step == 0 or last) and not done:
                block = copies.popleft()()  # the only host synchronisation
                if step == 0:
                    self.stats.prefill_seconds = time.perf_counter() - start
                pieces = [row.push(tokens, final=last and not copies) for row, tokens in zip(rows, block)]
                yield rows, pieces
                done = all(row.finish_reason for row in rows)
            if done:
                break
        steps.close()
        self.stats.new_tokens = sum(len(row.token_ids) for row in rows)
        self.stats.decode_seconds = time.perf_counter() - start - self.stats.prefill_seconds

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text, but this checkpoint folder has no tokenizer: "
                                 f"pass token ids")
            ids = self.tokenizer.encode(prompt, bos=self.tokenizer.adds_bos)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def _ensure_cache(self, batch: int, length: int) -> None:
        """Allocate the static KV cache, growing it only when a call needs more rows or positions."""
        if self._cache_shape and batch <= self._cache_shape[0] and length <= self._cache_shape[1]:
            return
        batch = max(batch, self.max_batch_size or 0, self._cache_shape[0] if self._cache_shape else 0)
        length = min(self.max_seq_len, max(length, self._cache_shape[1] if self._cache_shape else 0))
        self._release_cache()
        try:
            self.model.setup_cache(batch, length)
        except torch.OutOfMemoryError as e:
            raise MemoryError(
                f"out of {self.device.type} memory allocating the KV cache for {batch} rows x {length} positions "
                f"({self._cache_bytes(batch, length) / 2**30:.1f} GiB): use fewer prompts, shorter prompts or "
                f"max_new_tokens, or a smaller max_seq_len"
            ) from e
        self._cache_shape = (batch, length)

    def _release_cache(self) -> None:
        self.model.clear_cache()
        self._cache_shape = None

    def _cache_bytes(self, batch: int, length: int) -> int:
        c = self.model.config  # this rank's kv heads
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.model.embed_tokens.weight.element_size() \
            * batch * length

    def _positions_that_fit(self) -> int:
        """How many cache positions (for max_batch_size rows) fit in half of the free memory now."""
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(256, free // 2 // self._cache_bytes(self.max_batch_size or 1, 1))


class _Row:
    """One row's output: token ids, text, and why it stopped. Text is held back while it could still turn
    out to be the beginning of a stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop_ids: set[int], stop: list[str]):
        self.tokenizer, self.stop_ids, self.stop = tokenizer, stop_ids, stop
        self.decoder = tokenizer.stream_decoder() if tokenizer else None
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.emitted = 0  # characters of text already yielded
        self.finish_reason: str | None = None
        self.cut = False  # the text was cut at a stop string

    def push(self, tokens: list[int], final: bool) -> str:
        """Take the next tokens of this row; return the text that can be shown now."""
        for token in tokens:
            if self.finish_reason:
                break
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            if self.decoder is not None:
                self._add_text(self.decoder.push(token))
        if not self.finish_reason and final:
            self.finish_reason = "length"
        if self.finish_reason and self.decoder is not None:
            self._add_text(self.decoder.flush())  # bytes held back for an unfinished character
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        piece = self.text[self.emitted: max(self.emitted, len(self.text) - hold)]
        self.emitted += len(piece)
        return piece

    def _add_text(self, new: str) -> None:
        if self.cut:
            return
        self.text += new
        for s in self.stop:
            index = self.text.find(s)
            if index >= 0:  # cut before the stop string; tokens already taken stay in token_ids
                self.text, self.finish_reason, self.cut = self.text[:index], "stop", True

    def result(self) -> GenerationResult:
        return GenerationResult(self.token_ids, self.text if self.tokenizer else None, self.finish_reason or "length")


def _copy_to_host(block: Tensor) -> Callable[[], list[list[int]]]:
    """Start copying a block of tokens to the host without waiting; the returned function waits, then lists them."""
    if block.device.type != "cuda":
        return block.tolist
    host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
    host.copy_(block, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[list[int]]:
        copied.synchronize()
        return host.tolist()

    return wait


def _out_of_memory_explained(steps: Iterator[Tensor], batch: int, longest: int) -> Iterator[Tensor]:
    """The decode steps, with running out of device memory (a long prefill, say) explained in one line."""
    try:
        yield from steps
    except torch.OutOfMemoryError as e:
        raise MemoryError(
            f"out of device memory generating for {batch} prompt(s) of up to {longest} tokens: use fewer or "
            f"shorter prompts, or split the model over GPUs with torchrun"
        ) from e


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not prompts:
        raise ValueError("prompts is empty")
    return list(prompts)


def _generation_config_eos(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (Llama 3 Instruct lists 128001, 128008, 128009)."""
    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
