"""The Python API: `Llama.from_pretrained(folder)`, then `logits`, `generate` and `stream`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llama import generate, quant
from llama.arguments import DEVICE_TYPES, ArgumentError, check, check_device_name, check_stop, spelled
from llama.config import ConfigError, ModelConfig, read_json
from llama.generate import GenerationResult, SamplingParams, decode_step, prefill_step, verify_step
from llama.hub import resolve_model
from llama.model import Joining, Linear, Transformer
from llama.quant import QuantizationConfig
from llama.scheduler import Output, Request, RowState, Scheduler
from llama.speculative import (
    DEFAULT_SPECULATIVE_TOKENS,
    PROMPT_LOOKUP,
    DraftModel,
    PromptLookup,
    acceptance,
    check_draft,
    pack_for_verify,
)
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tp import TensorParallel, shared_seed
from llama.weights import CheckpointError, find_checkpoint, load_model

Prompt = str | Sequence[int]
SHORTEST_CACHE = 256  # positions: the KV cache is allocated in powers of two from here (`Llama._ensure_cache`)


def power_of_two_positions(length: int, limit: int) -> int:
    """`length` rounded up to a power of two of at least SHORTEST_CACHE, capped at `limit`: the cache's length, and
    the span a compiled GPU step reads, so that one allocation or graph serves many lengths."""
    return min(limit, 1 << (max(length, SHORTEST_CACHE) - 1).bit_length())


@dataclass
class GenerationStats:
    """What the last call did. The decode rate counts every token the decode steps produced, those decoded past a
    stop and dropped included (on a GPU a finish is seen a step late, scheduler.py): it is the speed of decoding,
    which the tokens kept would understate for a short answer."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0  # kept, over all rows
    decode_seconds: float = 0.0
    decode_steps: int = 0  # decode (or verify) forward passes after the prefill
    decoded_tokens: int = 0  # tokens those passes produced (rows still generating, summed over the steps)
    rows: int = 1
    proposed_tokens: int = 0  # speculative decoding: tokens proposed to verify steps
    accepted_tokens: int = 0  # and those of them kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None

    def summary(self) -> str:
        prefill = self.prompt_tokens / max(self.prefill_seconds, 1e-9)
        decode = self.decoded_tokens / max(self.decode_seconds, 1e-9)
        line = (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s ({prefill:.1f} tok/s); "
                f"decode: {self.new_tokens} tokens in {self.decode_seconds:.2f} s ({decode:.1f} tok/s)")
        return line + (f"; {acceptance(self.accepted_tokens, self.proposed_tokens)}" if self.proposed_tokens else "")


def default_device_and_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None,
                             as_flag: bool = False) -> tuple[torch.device, torch.dtype]:
    """cuda + bfloat16 when a GPU is present, else cpu + float32; either may be given explicitly, and a device
    given must be present here. A bad one is an ArgumentError naming `device` / `dtype` (`--device` / `--dtype`
    with `as_flag`), raised before any work."""
    device = _present_device(device, as_flag)
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ArgumentError(f"{spelled('dtype', as_flag)} {dtype!r}: choose from {', '.join(names)}")
        dtype = names[dtype]
    elif dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentError(f"dtype must be 'bf16', 'fp16', 'fp32' or a floating-point torch.dtype, got {dtype!r}")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _present_device(device: str | torch.device | None, as_flag: bool) -> torch.device:
    """The device asked for, checked against this machine (its torch build and its GPUs)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = spelled("device", as_flag)
    if isinstance(device, str):
        device = torch.device(check_device_name(device, as_flag))
    elif not isinstance(device, torch.device) or device.type not in DEVICE_TYPES:
        raise ArgumentError(f"{label} must be 'cpu', 'cuda', 'cuda:N', 'mps', 'xpu' or such a torch.device, "
                            f"got {device!r}")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type)  # torch.cuda, torch.mps, torch.xpu
    if not backend.is_available():
        why = {"cuda": f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)",
               "mps": "no Apple GPU (Metal) is available"}.get(device.type, f"torch finds no {device.type} device")
        raise ArgumentError(f"{label} {device}: not available here: {why}; use {label} cpu")
    if device.index is not None and device.index >= backend.device_count():
        count = backend.device_count()
        raise ArgumentError(f"{label} {device}: this machine has {count} {device.type} device(s), "
                            f"{device.type}:0 to {device.type}:{count - 1}")
    return device


class CompiledDecodeStep:
    """The decode step as one CUDA graph (torch.compile "reduce-overhead"): it removes the per-kernel launch cost
    that dominates small-batch decoding. Compiles once per batch size and cache length (tens of seconds).

    On a CPU the step runs eagerly around the compiled layers and output projection (`compile_layers`): one
    compilation that the layers share takes ~3 s, where the whole step as one graph took ~37 s (and again for
    each new span) for ~15% less time per step (docs/benchmarks.md, CPU).

    On a GPU one graph serves every way of choosing the token: the choice's parameters go in as tensors (greedy
    is temperature 0 with a race of ones, no top-k is k = V), and the k-th largest logit comes from a kernel that
    takes k as a tensor (`kernels.kth_largest`). So greedy and sampling run the very same kernels, and a new
    temperature or top-k compiles nothing.

    Two global Inductor settings are switched on here only (docs/benchmarks.md has the Llama-3.1-8B batch-1
    figures on an H100): coordinate-descent tuning of Inductor's kernels (7.3 -> 6.5 ms a step), and programmatic
    dependent launch on Hopper and later GPUs, which lets each kernel start while the one before it finishes
    (each waits for its inputs inside; 5.84 -> 5.62 ms a step).

    On a GPU the cache slots a step reads (`span`) are rounded up to a power of two (at least 256), so that a
    graph serves many steps: a step reads at most twice the slots in use, and a long answer or chat records
    another graph a few times, not at every step. `kernels.decode_attention` (used when the head dim is a power
    of two) needs no span: it stops at each row's position by itself."""

    def __init__(self):
        torch._inductor.config.coordinate_descent_tuning = True
        if hasattr(torch._inductor.config.triton, "enable_pdl"):  # (torch >= 2.10)
            torch._inductor.config.triton.enable_pdl = True
        # One static compilation per batch size (the scheduler's sizes are few: Scheduler.batch_sizes). Left to
        # Dynamo, the third size made a dynamic step whose guards held only for the sizes that split the cache
        # into as many pieces (kernels.decode_attention), and each new size compiled again, for up to a minute.
        self.step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self.verify_graph: Callable[..., Tensor] | None = None  # compiled at the first speculative step
        self.prefill_graphs = PrefillGraphs()
        self.constants: dict[tuple, Tensor] = {}
        self.rows: dict[tuple, RowState] = {}  # `row_state`

    chooses_tokens = True  # on a GPU the scheduler lets the step choose the tokens (`generate.pick`)

    def __call__(self, model: Transformer, token: Tensor, position: Tensor, in_step: bool = False,
                 race: Tensor | None = None, temperature: Tensor | None = None, top_k: Tensor | None = None,
                 span: int | None = None, joining: Joining | None = None, advance: Tensor | None = None) -> Tensor:
        if not token.is_cuda:
            return decode_step(model, token, position, in_step, race, temperature, top_k, span=span, joining=joining,
                               advance=advance)
        attention = model.layers[0].attention
        if attention.decode_kernel is not None:
            span = None  # the kernel reads up to each row's position, whatever the span
        elif span is not None:
            span = power_of_two_positions(span, attention.cache.k.shape[2])
        if not in_step:
            if joining is not None:  # (the logits of a step that prompts join: eagerly, around the compiled layers)
                return decode_step(model, token, position, span=span, joining=joining)
            return self.step(model, token, position, in_step, race, temperature, top_k, span=span)
        from llama.kernels import kth_largest  # (needs Triton, so only here)

        # (rows: the step's, and with `joining` its prompts' after them)
        B, V = token.shape[0] + (0 if joining is None else joining.tokens.shape[0]), model.lm_head.out_features
        if race is None:  # greedy
            race = self._constant(("ones", B, V), lambda: torch.ones(B, V, device=token.device))
            temperature = self._constant(("zero", B), lambda: torch.zeros(B, 1, device=token.device))
        if top_k is None:
            top_k = self._constant(("k", B, V), lambda: torch.full((B,), V, device=token.device))
        if joining is not None:  # (the prompts' prefill and this step, replayed from one graph)
            return self.prefill_graphs.joined(model, token, position, race, temperature, top_k, joining)
        for view in (token, position, race, temperature, top_k, advance):
            if view is not None and view.untyped_storage().data_ptr() in self.row_pointers:  # (`row_state`'s)
                torch._dynamo.mark_static_address(view)  # (a view made at this step: marked afresh)
        return self.step(model, token, position, True, race, temperature, top_k, kth_largest, span=span,
                         advance=advance)

    def row_state(self, slots: int, vocab_size: int, device: torch.device) -> RowState:
        """The scheduler's per-row inputs of a step, at their starting values: the same buffers from one scheduler
        to the next, so that the step's CUDA graph reads them where they are (their views marked static above), and
        writes the next token and position there itself. An input at an address the graph has not recorded is
        first copied into one it has, at every replay, and a marked one at a new address records the graph anew:
        so the scheduler passes these for greedy steps as for sampled ones. One scheduler at a time steps with
        them, as one at a time uses the model's KV cache."""
        key = slots, vocab_size, device
        if key not in self.rows:
            self.rows[key] = RowState.new(slots, vocab_size, device)
        return self.rows[key].reset()

    @property
    def row_pointers(self) -> set[int]:
        return {buffer.data_ptr() for rows in self.rows.values() for buffer in vars(rows).values()}

    def verify(self, model: Transformer, tokens: Tensor, positions: Tensor, span: int, choose: bool = False) -> Tensor:
        """`generate.verify_step` (speculative decoding's k + 1 tokens a row), as a CUDA graph of its own on a GPU
        (one per batch size, k and span, the span rounded as the decode step's); on a CPU eagerly, around the
        layers compiled for a few tokens (`compile_layers`)."""
        if not tokens.is_cuda:
            return verify_step(model, tokens, positions, span, choose)
        if self.verify_graph is None:
            self.verify_graph = torch.compile(verify_step, mode="reduce-overhead", fullgraph=True)
        span = power_of_two_positions(span, model.layers[0].attention.cache.k.shape[2])
        return self.verify_graph(model, tokens, positions, span, choose)

    def _constant(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """Greedy decoding's parameters, for callers other than the scheduler (which passes `row_state`'s). Not
        marked static: a graph recorded with them would be recorded again for the next caller's own tensors."""
        if key not in self.constants:
            self.constants[key] = make()
        return self.constants[key]

    def prefill(self, model: Transformer, tokens: Tensor, logits_at: Tensor, rows: Tensor) -> Tensor:
        """`generate.prefill_step`; on a GPU replayed from a CUDA graph of its bucket (`PrefillGraphs`)."""
        if not tokens.is_cuda:
            return prefill_step(model, tokens, logits_at, rows)
        return self.prefill_graphs.prefill(model, tokens, logits_at, rows)


class PrefillGraphs:
    """Prefills, alone or joining a decode step (model.Joining), replayed from CUDA graphs: one per bucket,
    recorded at the bucket's first use.

    Launching a prefill's ~400 kernels (the layers compiled for every length, `compile_layers`) takes the host
    12-25 ms on the Llama-3.1-8B shape, where one prompt of 160 tokens is ~8 ms of GPU work, and a request joining
    a running batch stops every other row for it (scheduler.py). Replaying a graph takes ~1 ms (H100,
    docs/benchmarks.md, "Serving"). Whole-model compilation per bucket ("reduce-overhead") replays as fast but
    compiled for ~75 s a bucket; these graphs record the layers already compiled, in the time of two prefills.

    A bucket is n prompts rounded up to a power of two (the extra rows repeat the first prompt into its own cache
    row: the same values written twice) by T tokens rounded up to a power of two or 1.5 times one, at least 16
    and at most the cache's length (so at most a third of a bucket's tokens pad), and for a decode step that they
    join, its B rows. The positions past a prompt's end hold
    padding: causal attention keeps it from the prompt's own tokens, and the keys and values it leaves in the cache
    lie past the row's position, where its decode steps write before they read. A bucket of more than `max_tokens`
    prompt tokens runs without a graph: its GPU time hides the launches. With `record=False` (the CPU tests of the
    padding) a bucket runs plainly."""

    MAX_TOKENS = 2048  # prompts x tokens of the largest bucket replayed from a graph

    def __init__(self, max_tokens: int = MAX_TOKENS, record: bool = True):
        self.max_tokens, self.record = max_tokens, record
        self.buckets: dict[tuple[int, int, int], _Bucket] = {}  # (B, or 0 for a prefill alone; N, L)
        self.pool = None  # one memory pool for every bucket's graph: they run one at a time

    def prefill(self, model: Transformer, tokens: Tensor, logits_at: Tensor, rows: Tensor) -> Tensor:
        """`generate.prefill_step`: -> logits [n, V]."""
        n, T = tokens.shape
        N, L = self._shape(model, n, T)
        if N * L > self.max_tokens:
            return prefill_step(model, tokens, logits_at, rows)
        inputs = _padded_prompts(Joining(tokens, rows, logits_at), N, L)
        logits = self._run((0, N, L), inputs, lambda b: prefill_step(model, b["tokens"], b["logits_at"], b["rows"]))
        return logits[:n]

    def joined(self, model: Transformer, token: Tensor, position: Tensor, race: Tensor | None,
               temperature: Tensor | None, top_k: Tensor | None, joining: Joining) -> Tensor:
        """`generate.decode_step` with prompts joining, choosing the tokens (`generate.pick`): -> tokens [B + n].

        From the scheduler, at least 2 rows: the layers, compiled for every size (`compile_layers`), compile a size
        of 1 apart (Dynamo specializes sizes 0 and 1). One prompt joining is that size too: `Scheduler.warm_up`
        compiles it, and two prompts, before serving (each takes seconds, in which every row would wait). A bucket
        too large for a graph runs padded all the same. (Used with `Scheduler(join=True)`: docs/benchmarks.md,
        "Serving".)"""
        if token.is_cuda:
            from llama.kernels import kth_largest as kth  # (needs Triton, so only here)
        else:
            kth = generate.kth_largest
        B, (n, T) = token.shape[0], joining.tokens.shape
        N, L = self._shape(model, n, T)
        inputs = _padded_prompts(joining, N, L)
        every = torch.cat([torch.arange(B, device=token.device), B + inputs.pop("pick")])  # [B + N]
        inputs |= dict(token=token, position=position,
                       **{name: t[every] for name, t in (("race", race), ("temperature", temperature),
                                                         ("top_k", top_k)) if t is not None})

        def step(b: dict[str, Tensor]) -> Tensor:
            return decode_step(model, b["token"], b["position"], True, b.get("race"), b.get("temperature"),
                               b.get("top_k"), kth, joining=Joining(b["tokens"], b["rows"], b["logits_at"]))

        return self._run((B, N, L), inputs, step, use_graph=N * L <= self.max_tokens)[:B + n]

    def _shape(self, model: Transformer, n: int, T: int) -> tuple[int, int]:
        N = 1 << (n - 1).bit_length()
        T = max(T, 16)
        L = 1 << (T - 1).bit_length()  # T <= L, a power of two; 3 L / 4 when that holds T too
        if 3 * L // 4 >= T:
            L = 3 * L // 4
        return N, min(model.layers[0].attention.cache.k.shape[2], L)

    def _run(self, key: tuple[int, int, int], inputs: dict[str, Tensor], run: Callable[[dict[str, Tensor]], Tensor],
             use_graph: bool = True) -> Tensor:
        bucket = self.buckets.get(key)
        if bucket is None:  # its inputs at fixed addresses: a graph reads from there
            bucket = self.buckets[key] = _Bucket({name: tensor.clone() for name, tensor in inputs.items()})
        else:
            for name, tensor in inputs.items():
                bucket.inputs[name].copy_(tensor)
        if bucket.graph is not None:
            bucket.graph.replay()
        elif not (self.record and use_graph):
            bucket.output = run(bucket.inputs)
        else:
            stream = torch.cuda.Stream()  # (a warm-up on a side stream, as CUDA graphs want: compiles for the shape)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run(bucket.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # (thread_local: the server's event loop may touch CUDA meanwhile, say a seeded request's generator)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                bucket.output = run(bucket.inputs)
            graph.replay()
            bucket.graph = graph
        return bucket.output


@dataclass
class _Bucket:
    inputs: dict[str, Tensor]
    output: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


def _padded_prompts(prompts: Joining, N: int, L: int) -> dict[str, Tensor]:
    """n prompts [n, T] -> a bucket's N x L (see PrefillGraphs), their rows and last positions, and `pick` [N]:
    which prompt each of the N rows is."""
    n, T = prompts.tokens.shape
    index = torch.arange(N, device=prompts.tokens.device)
    pick = index * (index < n)  # 0 .. n-1, then the first again
    return dict(tokens=F.pad(prompts.tokens[pick], (0, L - T)), rows=prompts.rows[pick],
                logits_at=prompts.logits_at[pick], pick=pick)


def compile_layers(model: Transformer) -> None:
    """On a GPU: the prefill cannot be one CUDA graph (its length changes from call to call), and eagerly its cost
    is launching ~1,400 kernels (a 128-token prompt: 36 ms on an H100 for 8B). Each layer is compiled instead,
    once, for every length (`dynamic=True`); the 32 layers share that compilation. Inside the compiled decode
    step the layers are traced like any other code.

    On a CPU the decode step runs eagerly (`CompiledDecodeStep`) and calls each layer, and the output projection,
    compiled for one token: one compilation that the layers share (~3 s), and Inductor's one-row products
    (`model.Linear`). The prefill stays eager: at the demo's sizes it is as fast as compiled, and compiling it for
    every length took ~15 s more (docs/benchmarks.md, CPU). It is compiled here, at load, for one row and the
    shortest cache: compiling in the first answer would count in its decode speed. A quantized model whose decode
    steps run fused C++ blocks (`quant.fuse_cpu_decode`) has nothing to compile for one token."""
    # The layers of every model in the process share one code object, and so Dynamo's limit of 8 compilations of
    # it: each model shape and weight format (dense, int8, int4) takes one or two, a draft model and the verify
    # steps more. Those are specializations, not runaway recompiling: allow 64.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if model.embed_tokens.weight.is_cuda:
        # Dynamo's "duck shaping" gives sizes that happen to be equal one symbol (a prompt of 128 tokens and the head
        # dim 128; 64 rows and 64 tokens), and code compiled so holds only while they stay equal: each new
        # coincidence compiled again, for seconds, in the middle of serving (docs/benchmarks.md, Serving). Every
        # size its own symbol. (A process-wide setting; it changes which shapes share compiled code, never results.)
        torch.fx.experimental._config.use_duck_shape = False
        for layer in model.layers:
            layer.compile(dynamic=True)
        return
    for layer in model.layers:
        layer.forward = _compiled_for_decode(layer.forward, lambda x, *args: args[3] is not None)
    if quant.fusable(model):  # (its decode steps run fused blocks, `Llama`, and its output projection the C++ kernel:
        return                # nothing compiled for one token would run; verify steps compile their layers when met)
    model.lm_head.forward = _compiled_for_decode(model.lm_head.forward, lambda x: True)
    device = model.embed_tokens.weight.device
    model.setup_cache(1, SHORTEST_CACHE)
    with torch.inference_mode():  # two steps: at the second, the span read changes and Dynamo makes it dynamic
        for position in (0, 1):
            model(torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([[position]], device=device),
                  span=position + 1)
    model.clear_cache()


def _compiled_for_decode(forward: Callable[..., Tensor], verifying: Callable[..., bool]) -> Callable[..., Tensor]:
    """A module's forward, compiled for inputs x [B, 1, C] (a decode step) and [B, T <= Linear.SMALL, C] when
    `verifying(x, *args)` (a speculative verify step, whose layers get a mask; a prefill's get none), eager for
    any other shape."""
    compiled = torch.compile(forward, fullgraph=True)

    def decode_compiled(x: Tensor, *args) -> Tensor:
        T = x.shape[1] if x.dim() == 3 else 0
        if T == 1 or (1 < T <= Linear.SMALL and verifying(x, *args)):
            return compiled(x, *args)
        return forward(x, *args)

    return decode_compiled


class Llama:
    """A loaded model, its config, and its tokenizer (None when the folder has no tokenizer files)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None, eos_token_ids: Sequence[int] = (), compile: bool = False,
                 config: ModelConfig | None = None):
        self.model = model  # under tensor parallelism, this rank's part (model.config: its local shape)
        self._decode_step = CompiledDecodeStep() if compile else decode_step
        if compile:
            compile_layers(model)
            if model.embed_tokens.weight.is_cuda:
                model.use_triton_kernels()
        if model.embed_tokens.weight.is_cuda:
            quant.fuse_gpu_decode(model)
        else:
            quant.fuse_cpu_decode(model)
        self.config: ModelConfig = config or model.config  # the whole model's shape
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        check_max_seq_len(max_seq_len, self.config)
        limit = self.config.max_position_embeddings
        self.max_seq_len = max_seq_len or min(limit, self._positions_that_fit())
        self.eos_token_ids = sorted(set(eos_token_ids) | set(self.config.eos_token_ids)
                                    | set(tokenizer.eos_ids if tokenizer else ()))
        self.stats = GenerationStats()  # of the last generate / stream call
        self._cache_shape: tuple[int, int] | None = None  # (batch, length) of the allocated KV cache
        self._verify_ready = False  # speculative decoding's verify step prepared (`_prepare_verify`)

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
        (quant.py). A checkpoint written by `llama quantize` is loaded quantized without the argument.

        `source` may also be a hub repo id ("meta-llama/Llama-3.2-1B-Instruct"), found in the Hugging Face cache or
        downloaded, as the command line's --model. Every argument is checked before anything is loaded."""
        if not isinstance(source, (str, os.PathLike)):
            raise ArgumentError(f"source must be a folder or a hub repo id (a str or a Path), got {source!r}")
        max_seq_len, max_batch_size = check("max_seq_len", max_seq_len), check("max_batch_size", max_batch_size)
        for name, value in (("progress", progress), ("compile", compile)):
            if not isinstance(value, bool):
                raise ArgumentError(f"{name} must be True or False, got {value!r}")
        quantization = QuantizationConfig.make(quantize, group_size)
        tensor_parallel = TensorParallel.from_environment()
        if tensor_parallel and device is None and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        device, dtype = default_device_and_dtype(device, dtype)
        try:
            source = resolve_model(source, name="source")
        except ValueError as e:  # (no such folder, or a file: a CheckpointError, as find_checkpoint's own)
            raise CheckpointError(str(e)) from None
        kind, folder = find_checkpoint(source)
        if kind == "hf":  # (a Meta checkpoint's config is complete only once its weights are read: see __init__)
            check_max_seq_len(max_seq_len, ModelConfig.from_file(folder / "config.json"))
        eos_token_ids = _generation_config_eos(source)
        tokenizer = load_tokenizer(source) or load_tokenizer(folder)  # (read first: a bad file is found in a second)
        progress = progress and (tensor_parallel is None or tensor_parallel.rank == 0)
        config, model = load_model(folder, device, dtype, progress=progress, tensor_parallel=tensor_parallel,
                                   quantize=quantization)
        return cls(model, tokenizer, max_seq_len, max_batch_size, eos_token_ids, compile, config)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------ logits
    @torch.inference_mode()
    def logits(self, tokens: Tensor | Sequence[Sequence[int]]) -> Tensor:
        """tokens [B, T] -> float32 logits [B, T, V]: one full causal forward, no cache."""
        if isinstance(tokens, Tensor) and (tokens.is_floating_point() or tokens.is_complex()):
            raise ArgumentError(f"tokens must hold token ids (an integer tensor), got a {tokens.dtype} tensor")
        if not isinstance(tokens, Tensor) and not (isinstance(tokens, Sequence) and tokens
                                                   and all(map(_is_token_list, tokens))
                                                   and len(set(map(len, tokens))) == 1):
            raise ArgumentError("tokens must be [batch, length]: rows of token ids (ints), all of one length, or an "
                                "integer tensor")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ArgumentError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ArgumentError(f"tokens must be token ids in [0, {self.config.vocab_size})")
        self._release_cache()
        return self.model(tokens).float()

    def perplexity(self, text: str, context: int = 512) -> float:
        """exp(mean negative log-likelihood) of the text's tokens, scored in windows of `context` tokens, each run
        alone (the exact definition is in perplexity.py, which also compares against a reference model)."""
        from llama.perplexity import perplexity

        if not isinstance(text, str):
            raise ArgumentError(f"text must be a str, got {type(text).__name__}")
        return perplexity(self, text, check("context", context)).perplexity

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
        stop: str | Sequence[str] | None = None,
        stop_token_ids: int | Sequence[int] | None = None,
        draft: str | Llama | None = None,
        num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
    ) -> list[GenerationResult]:
        """Continue each prompt (a string or a list of token ids), in one batch; one result per prompt.

        Greedy at temperature 0; otherwise the sampling options mean what transformers means by them. Generation
        of a row stops at any end-of-sequence id of the checkpoint, at `stop_token_ids`, or when its text contains
        one of the `stop` strings (the text is cut before it); `.token_ids` never include the stop token. One stop
        string may be given as a str. Every argument is checked first: a ValueError names the first bad one.

        draft: speculative decoding (speculative.py): "prompt-lookup" (proposals copied from the prompt and the
        answer so far), or a smaller model with the same vocabulary (a `Llama` loaded on the same device),
        proposing `num_speculative_tokens` tokens a step. The output is the same (greedy: token for token; sampled:
        in distribution); `stats` counts the proposed and accepted tokens. It pays at small batches on text that
        the proposals can predict.
        """
        batch = _as_batch(prompts)
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        arguments = self._checked(max_new_tokens, params, seed, stop, stop_token_ids)
        speculation = self._speculation(draft, num_speculative_tokens)
        outputs: list[Output] = []
        for outputs, _ in self._run(batch, arguments[0], params, *arguments[1:], streaming=False,
                                    speculation=speculation):
            pass
        return [output.result() for output in outputs]

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: int | Sequence[int] | None = None,
        draft: str | Llama | None = None,
        num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
    ) -> Iterator[str]:
        """Like `generate` for one prompt, yielding the text as it is decoded (never half a character). The
        arguments are checked when it is called, not when the first piece is asked for."""
        batch = _as_batch(prompt)
        if not (isinstance(prompt, str) or _is_token_list(prompt)):
            raise ArgumentError("prompt: stream takes one prompt (a string or a list of token ids)")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer, and this checkpoint folder has none")
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        arguments = self._checked(max_new_tokens, params, seed, stop, stop_token_ids)
        speculation = self._speculation(draft, num_speculative_tokens)
        return self._pieces(batch, arguments[0], params, *arguments[1:], speculation=speculation)

    def _pieces(self, batch: list[Prompt], max_new_tokens: int, params: SamplingParams, seed: int | None,
                stop: list[str], stop_token_ids: list[int],
                speculation: tuple[str | Llama, int] | None) -> Iterator[str]:
        for _, pieces in self._run(batch, max_new_tokens, params, seed, stop, stop_token_ids, streaming=True,
                                   speculation=speculation):
            if pieces[0]:
                yield pieces[0]

    def _speculation(self, draft: str | Llama | None, num_speculative_tokens: int) -> tuple[str | Llama, int] | None:
        """The speculative decoding arguments, checked: None (off), or (draft, k)."""
        k = check("num_speculative_tokens", num_speculative_tokens)
        if draft is None:
            return None
        if isinstance(draft, str):
            if draft != PROMPT_LOOKUP:
                raise ArgumentError(f"draft {draft!r}: pass {PROMPT_LOOKUP!r}, a Llama (a draft model), or None")
        elif not isinstance(draft, Llama):
            raise ArgumentError(f"draft must be {PROMPT_LOOKUP!r}, a Llama (a draft model) or None, got "
                                f"{type(draft).__name__}")
        elif draft is self or draft.model is self.model:
            raise ArgumentError("draft: a draft model needs a KV cache of its own; load it separately (for "
                                "example a smaller model with the same tokenizer)")
        elif draft.device != self.device:
            raise ArgumentError(f"draft: it is on {draft.device}, the model on {self.device}: load both on one device")
        else:
            check_draft(draft, self.config.vocab_size, self.tokenizer)
        return draft, k

    def _speculator(self, speculation: tuple[str | Llama, int] | None) -> PromptLookup | DraftModel | None:
        """The scheduler's proposer for checked speculation arguments (`_speculation`). A draft model's KV cache is
        set up with this model's rows and length (call after `_ensure_cache`)."""
        if speculation is None:
            return None
        draft, k = speculation
        self._prepare_verify()
        if isinstance(draft, str):
            return PromptLookup(k)
        if draft._cache_shape != self._cache_shape:
            draft._release_cache()
            draft.model.setup_cache(*self._cache_shape)
            draft._cache_shape = self._cache_shape
        draft._prepare_verify()
        return DraftModel(draft.model, draft._decode_step, k)

    def _prepare_verify(self) -> None:
        """On a CPU, once: the verify step's products (speculative.pack_for_verify), and with `compile=True` its
        layers compiled for a few tokens now, as `compile_layers` compiles them for one token at load (compiled in
        the first answer, they would count in its decode speed). Needs the cache set up; the positions it writes in
        row 0 are written again by the next prefill."""
        if self._verify_ready or self.device.type != "cpu":
            return
        pack_for_verify(self.model)
        if isinstance(self._decode_step, CompiledDecodeStep):
            with torch.inference_mode():
                for T in (2, 3):  # (at the second length Dynamo compiles for any)
                    tokens = torch.zeros(1, T, dtype=torch.long, device=self.device)
                    self.model(tokens, input_pos=torch.arange(T, device=self.device)[None], span=T)
        self._verify_ready = True

    def _checked(self, max_new_tokens: int, params: SamplingParams, seed: int | None, stop: str | Sequence[str] | None,
                 stop_token_ids: int | Sequence[int] | None) -> tuple[int, int | None, list[str], list[int]]:
        """The generation arguments, checked (llama/arguments.py holds the ranges) before any work is done."""
        params.validate()
        max_new_tokens, seed, stop = check("max_new_tokens", max_new_tokens), check("seed", seed), check_stop(stop)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint folder has none")
        if isinstance(stop_token_ids, int) and not isinstance(stop_token_ids, bool):
            stop_token_ids = [stop_token_ids]
        if stop_token_ids is not None and not isinstance(stop_token_ids, Sequence):
            raise ArgumentError(f"stop_token_ids must be a token id or a list of them, got {stop_token_ids!r}")
        _check_token_ids(stop_token_ids or [], "stop_token_ids", self.config.vocab_size)
        return max_new_tokens, seed, stop, [int(t) for t in stop_token_ids or []]

    def _run(self, prompts: list[Prompt], max_new_tokens: int, params: SamplingParams, seed: int | None,
             stop: Sequence[str] | None, stop_token_ids: Sequence[int] | None, streaming: bool,
             speculation: tuple[str | Llama, int] | None = None) -> Iterator[tuple[list[Output], list[str]]]:
        """The shared loop over arguments `_checked` has seen: encode, then the scheduler's steps (scheduler.py)
        until every prompt is done; yields the outputs and the new text of each at every step (at the end only
        when not `streaming`)."""
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, prompt in enumerate(ids):
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(prompt) + max_new_tokens} positions, more than max_seq_len={self.max_seq_len}"
                )
        self._ensure_cache(len(ids), max(map(len, ids)) + max_new_tokens)
        # Unseeded, the rows draw from the scheduler's stream, seeded alike on every rank (tensor parallelism)
        scheduler = Scheduler(self.model, self._decode_step, self.tokenizer, self.eos_token_ids, shared_seed(seed),
                              speculator=self._speculator(speculation))
        # With a seed, prompt i is seeded with seed + i (as the server's n choices): each row repeats whatever else
        # is in the batch, and prompt 0 draws what one request with that seed draws from the server
        jobs = [scheduler.submit(Request(prompt, max_new_tokens, params, None if seed is None else (seed + i) % 2**64,
                                         stop=list(stop or ()), stop_token_ids=list(stop_token_ids or ())))
                for i, prompt in enumerate(ids)]
        row = {job: index for index, job in enumerate(jobs)}
        outputs = [job.output for job in jobs]
        self.stats = GenerationStats(prompt_tokens=sum(map(len, ids)), rows=len(ids))
        start = time.perf_counter()
        try:
            for updates in _out_of_memory_explained(scheduler.run(jobs), len(ids), max(map(len, ids))):
                if not self.stats.prefill_seconds and any(job.received for job in jobs):
                    self.stats.prefill_seconds = time.perf_counter() - start
                if streaming or all(job.done for job in jobs):
                    pieces = [""] * len(jobs)
                    for update in updates:
                        pieces[row[update.job]] += update.text
                    yield outputs, pieces
        finally:  # also when the caller stops early (closes the stream, Ctrl-C): count the tokens it was given
            self.stats.new_tokens = sum(len(output.token_ids) for output in outputs)
            self.stats.decode_steps, self.stats.decoded_tokens = scheduler.decode_steps, scheduler.decoded_tokens
            self.stats.proposed_tokens = scheduler.proposed_tokens
            self.stats.accepted_tokens = scheduler.accepted_tokens
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
        # A decode step reads the slots in use, not the whole cache: a longer cache costs memory, not time. In
        # powers of two, a chat whose history grows reallocates it (and compiles for it) a few times, not each turn.
        length = power_of_two_positions(max(length, self._cache_shape[1] if self._cache_shape else 0),
                                        self.max_seq_len)
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


def _out_of_memory_explained(steps: Iterator[list], batch: int, longest: int) -> Iterator[list]:
    """The decode steps, with running out of device memory (a long prefill, say) explained in one line."""
    try:
        yield from steps
    except torch.OutOfMemoryError as e:
        raise MemoryError(
            f"out of device memory generating for {batch} prompt(s) of up to {longest} tokens: use fewer or "
            f"shorter prompts, or split the model over GPUs with torchrun"
        ) from e


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or a list of token ids) or a list of them, as a list of prompts; anything else is an
    ArgumentError naming it (a tensor of ids, say: pass `tensor.tolist()`)."""
    if isinstance(prompts, Sequence) and len(prompts) == 0:
        raise ArgumentError("prompts is empty")
    if isinstance(prompts, str) or _is_token_list(prompts):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise ArgumentError(f"prompts must be a string, a list of token ids, or a list of those; got "
                            f"{type(prompts).__name__}" + (" (pass .tolist())" if hasattr(prompts, "tolist") else ""))
    for index, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) or _is_token_list(prompt)):
            raise ArgumentError(f"prompt {index} must be a string or a list of token ids (ints), got "
                                f"{_shortened(prompt)}")
    return list(prompts)


def _is_token_list(value: object) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _shortened(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_token_ids(ids: Sequence[object], name: str, vocab_size: int) -> None:
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ArgumentError(f"{name} must be token ids in [0, {vocab_size}), got {_shortened(token)}")


def check_max_seq_len(max_seq_len: int | None, config: ModelConfig, as_flag: bool = False) -> None:
    """max_seq_len (None: as much as fits) must be a whole number >= 1, and within the model's context."""
    check("max_seq_len", max_seq_len, as_flag)
    if max_seq_len is not None and max_seq_len > config.max_position_embeddings:
        raise ArgumentError(f"{spelled('max_seq_len', as_flag)} {max_seq_len}: more than the model's "
                            f"max_position_embeddings={config.max_position_embeddings}")


def _generation_config_eos(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (Llama 3 Instruct lists 128001, 128008, 128009)."""
    path = folder / "generation_config.json"
    if not path.exists():
        return []
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object ({{...}})")
    eos = data.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise ConfigError(f"{path}: eos_token_id={data['eos_token_id']!r}: expected a token id or a list of them")
    return eos
