"""Experiments behind the GPU fast path (notes in docs/benchmarks.md): time one decode step, and decode
attention over a long cache, for several variants in one run.

    python scripts/decode_variants.py             # step time, prefill, long context, attention kernels
    python scripts/decode_variants.py --batch1    # batch 1: each matrix-vector product, cuBLAS against Triton;
                                                  # decode attention over a short cache; end-to-end variants
    python scripts/decode_variants.py --timeline OUT  # batch 1: every kernel of one generate call, with its start
                                                  # and duration (OUT/timeline_MODE.json.gz); --modes sets their
                                                  # order, --set KEY=VALUE tries an Inductor setting
    python scripts/decode_variants.py --long      # decode at 32k and 128k tokens of context
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth, matmul_flops, random_engine_model, time_ours, weight_bytes  # noqa: E402

from llama.config import ModelConfig  # noqa: E402
from llama.generate import decode_step  # noqa: E402
from llama.model import Transformer, reference_attention  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def bench(fn, repeat: int = 50) -> float:
    """Median seconds per call, CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def one_row_linears(model: Transformer, op) -> None:
    """Variant: every Linear sends a one-row input through `op(x [K], weight [N, K]) -> [N]`; other inputs (prefill,
    batches) still go to `F.linear`. Undo with `restore_linears`."""
    def forward(self, x):
        if x.numel() != self.in_features:
            return F.linear(x, self.weight, self.bias)
        y = op(x.reshape(-1), self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = forward.__get__(module, torch.nn.Linear)


def restore_linears(model: Transformer) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)


def multiply_and_sum(x, weight):
    """W x written out as a broadcast multiply and a float32 sum: Inductor fuses it as it likes (the variant was
    slower than leaving the matmul to Inductor; docs/benchmarks.md)."""
    return (x * weight).sum(-1, dtype=torch.float32).to(x.dtype)


def step_time(model: Transformer, batch: int, cache_len: int, compile_mode: str | None) -> float:
    model.setup_cache(batch, cache_len)
    step = torch.compile(decode_step, mode=compile_mode, fullgraph=True) if compile_mode else decode_step
    token = torch.randint(0, 1000, (batch, 1), device="cuda")
    position = torch.full((batch, 1), cache_len // 2, device="cuda")
    with torch.inference_mode():
        seconds = bench(lambda: step(model, token, position))
    model.clear_cache()
    return seconds


def attention_variants(context: int) -> dict[str, float]:
    """Decode attention (one query per row) over `context` cached positions, Llama-3.1-8B heads."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, K, D = 1, 32, 8, 128
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, K, context, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    position = torch.tensor([[context - 1]], device="cuda")
    mask = (torch.arange(context, device="cuda") <= position[:, :, None]).unsqueeze(1)
    results = {}
    results["sdpa + bool mask"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                               enable_gqa=True))
    reference = torch.compile(reference_attention)
    results["reference (grouped, compiled)"] = bench(lambda: reference(q, k, v, mask))

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= position[b, 0]

    block_mask = create_block_mask(visible, B, None, 1, context, device="cuda")
    flex = torch.compile(flex_attention)
    results["flex_attention (gqa)"] = bench(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
    kv_bytes = 2 * K * context * D * 2
    return {name: (seconds, kv_bytes / seconds / 1e9) for name, seconds in results.items()}


def prefill_efficiency(model: Transformer, tokens: int, peak_flops: float) -> tuple[float, float]:
    """Seconds for one prefill of `tokens` tokens, and the share of the measured matmul peak it reaches."""
    c = model.config
    matmul_params = c.n_layers * (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
                                  + c.n_heads * c.head_dim * c.dim + 3 * c.dim * c.ffn_dim)
    flops = 2 * matmul_params * tokens + 2 * tokens**2 * c.n_heads * c.head_dim * c.n_layers  # causal attention
    x = torch.randint(0, 1000, (1, tokens), device="cuda")
    model.setup_cache(1, tokens)
    with torch.inference_mode():
        seconds = bench(lambda: model(x, input_pos=torch.arange(tokens, device="cuda"),
                                      logits_at=torch.tensor([tokens - 1], device="cuda")), repeat=5)
    model.clear_cache()
    return seconds, flops / seconds / peak_flops


def long_generation(model: Transformer, context: int, new_tokens: int) -> dict:
    from llama.api import Llama

    llm = Llama(model, max_seq_len=context + new_tokens, compile=True)
    llm.eos_token_ids = []
    prompt = torch.randint(0, 1000, (context,)).tolist()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first run compiles
        llm.generate([prompt], max_new_tokens=new_tokens)
    s = llm.stats
    llm._release_cache()
    return {"context": context, "prefill_s": s.prefill_seconds, "decode_tok_s": (s.new_tokens - 1) / s.decode_seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def long_context(model: Transformer, config: ModelConfig) -> None:
    """Batch-1 decode after a 32k and a 128k-token prompt, against the bandwidth limit counting the KV bytes."""
    bandwidth = copy_bandwidth(torch.device("cuda"))
    step_bytes = weight_bytes(model)
    kv_bytes_per_position = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
    for context in (32768, 131072 - 64):
        torch._dynamo.reset()
        result = long_generation(model, context, 64)
        limit = bandwidth / (step_bytes + kv_bytes_per_position * (context + 32))
        print(f"long context {json.dumps(result)}; limit {limit:.1f} tok/s -> {result['decode_tok_s'] / limit:.0%}",
              flush=True)


def graph_time(fns: list, repeat: int = 10) -> float:
    """Seconds per call of the callables in `fns`, each called once in turn, replayed from one CUDA graph (no
    launch gaps between kernels of a few microseconds)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up outside the graph (Triton autotuning happens here)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat / len(fns)


def gemv_variants(config: ModelConfig, bandwidth: float) -> dict:
    """Each matrix-vector product of a batch-1 decode step, alone: cuBLAS (F.linear) against the Triton `gemv`.
    Several copies of each matrix are cycled through, so that none is served from the 50 MB L2 cache."""
    from triton_gemv import gemv

    C, H, K, D, F_, V = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim,
                         config.vocab_size)
    shapes = {"qkv_proj": ((H + 2 * K) * D, C), "o_proj": (C, H * D), "gate_up_proj": (2 * F_, C),
              "down_proj": (C, F_), "lm_head": (V, C)}
    totals = {"cublas": 0.0, "triton": 0.0, "floor": 0.0}
    for name, (N, Kdim) in shapes.items():
        copies = max(2, math.ceil(256e6 / (N * Kdim * 2)))
        ws = [torch.randn(N, Kdim, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, Kdim, device="cuda", dtype=torch.bfloat16)
        error = ((gemv(x[0], ws[0]).float() - (x.float() @ ws[0].float().T)[0]).abs().max()
                 / (x.float() @ ws[0].float().T).abs().max()).item()
        cublas = graph_time([lambda w=w: F.linear(x, w) for w in ws])
        triton = graph_time([lambda w=w: gemv(x[0], w) for w in ws])
        floor = N * Kdim * 2 / bandwidth
        for key, value in (("cublas", cublas), ("triton", triton), ("floor", floor)):
            totals[key] += value * (1 if name == "lm_head" else config.n_layers)
        print(f"gemv {name:12s} {N:6d} x {Kdim:5d} | cuBLAS {cublas * 1e6:7.1f} us {N * Kdim * 2 / cublas / 1e9:5.0f} "
              f"GB/s | Triton {triton * 1e6:7.1f} us {N * Kdim * 2 / triton / 1e9:5.0f} GB/s | copy-rate floor "
              f"{floor * 1e6:6.1f} us | Triton max rel. error {error:.1e}", flush=True)
        del ws
    print(f"gemv per step (32 layers + lm_head): cuBLAS {totals['cublas'] * 1e3:.3f} ms, Triton "
          f"{totals['triton'] * 1e3:.3f} ms, floor {totals['floor'] * 1e3:.3f} ms", flush=True)
    return totals


def short_attention_variants(config: ModelConfig, cache_len: int = 1024, position: int = 384) -> dict:
    """Decode attention of one layer at batch 1 over a short static cache (as `bench.py` runs it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, K, D = config.n_heads, config.n_kv_heads, config.head_dim
    qs = [torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    k, v = (torch.randn(1, K, cache_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = (torch.arange(cache_len, device="cuda") <= position).view(1, 1, 1, cache_len)
    results = {}
    for name, backend in (("sdpa default", None), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa math", SDPBackend.MATH)):
        def call(q, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        try:
            results[name] = graph_time([lambda q=q: call(q) for q in qs])
        except Exception as e:
            print(f"attention {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    reference = torch.compile(reference_attention)
    results["reference, compiled"] = graph_time([lambda q=q: reference(q, k, v, mask) for q in qs])
    for name, seconds in results.items():
        print(f"attention, one layer, cache {cache_len}, position {position} | {name:20s} | "
              f"{seconds * 1e6:6.1f} us | x {config.n_layers} layers = {seconds * config.n_layers * 1e3:.3f} ms",
              flush=True)
    return results


def profile_step(llm, model: Transformer, steps: int = 16) -> None:
    """The kernels of the compiled decode step as replayed (cache of 1024 positions, position 200)."""
    from torch.profiler import ProfilerActivity, profile

    token, position = torch.tensor([[7]], device="cuda"), torch.tensor([[200]], device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            llm._decode_step(model, token, position)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                llm._decode_step(model, token, position)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / steps
    print(f"  kernels per step: {sum(e.count for e in events) / steps:.0f}, device time {total:.0f} us", flush=True)
    for e in events[:12]:
        print(f"  {e.self_device_time_total / steps:8.1f} us/step  {e.count / steps:5.1f} x  {e.key[:90]}", flush=True)


def batch1(model: Transformer, config: ModelConfig) -> None:
    """Where the batch-1 decode step spends its time beyond reading the weights, and end-to-end variants
    measured as `bench.py` measures them (prompt 128, 256 new tokens, cache of 1024 positions)."""
    import triton
    from triton_gemv import _gemv_kernel, gemv

    from llama.api import Llama

    torch._inductor.config.coordinate_descent_tuning = True
    bandwidth = copy_bandwidth(torch.device("cuda"))
    step_bytes = weight_bytes(model)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights {step_bytes / 1e9:.2f} GB -> batch-1 limit "
          f"{bandwidth / step_bytes:.1f} tok/s", flush=True)
    gemv_variants(config, bandwidth)  # (autotunes `gemv` for every shape, on cold L2)
    short_attention_variants(config)

    chosen = {key[:2]: config for key, config in _gemv_kernel.cache.items()}  # (N, K) -> best Config
    for (N, K), c in chosen.items():
        print(f"gemv {N} x {K}: eager autotuning chose {c}", flush=True)

    @torch.library.triton_op("llama_experiments::gemv_fixed", mutates_args=())
    def gemv_fixed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`gemv` with the configuration chosen above, so that nothing is tuned inside the compiled graph."""
        N, K = weight.shape
        c = chosen[(N, K)]
        y = x.new_empty(N)
        torch.library.wrap_triton(_gemv_kernel.fn)[(triton.cdiv(N, c.kwargs["BLOCK_N"]),)](
            x, weight, y, N, K, weight.stride(0), **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        return y

    prompt = [torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()]
    modes = {"greedy": {"temperature": 0.0, "top_k": None}, "sample": {"temperature": 0.8, "top_k": 200}}
    variants = [("baseline (Inductor's own GEMV)", None), ("Triton gemv, fixed configs", gemv_fixed),
                ("Triton gemv, autotuned", gemv)]
    token = torch.tensor([[7]], device="cuda")
    results = {}
    for name, op in variants:
        start = time.perf_counter()
        row = {}
        try:
            if op is not None:
                one_row_linears(model, op)
            torch._dynamo.reset()
            llm = Llama(model, max_seq_len=1024, compile=True)
            llm.eos_token_ids = []
            row = {m: time_ours(llm, prompt, 256, sampling)[0] for m, sampling in modes.items()}
            print(f"end to end, batch 1 | {name:28s} | {json.dumps(row)} | {time.perf_counter() - start:.0f} s",
                  flush=True)
            profile_step(llm, model)
            with torch.inference_mode():  # the compiled step's logits against the eager reference step
                logits = llm._decode_step(model, token, torch.tensor([[200]], device="cuda")).float()
                restore_linears(model)
                reference = decode_step(model, token, torch.tensor([[200]], device="cuda")).float()
            row["rel_error_vs_eager"] = ((logits - reference).norm() / reference.norm()).item()
            llm._release_cache()
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        restore_linears(model)
        results[name] = row
    print(json.dumps(results))


def timeline(model: Transformer, out: Path, order: str = "greedy,sample") -> None:
    """Batch 1 as `bench.py` runs it (prompt 128, 256 new tokens, `compile=True`): tok/s, then one more generate
    call under the profiler. Every GPU activity of that call (kernels, copies, memsets) goes to
    OUT/timeline_MODE.json.gz as [name, start us, duration us], to be read on another machine, and a table of
    what a decode step spends in each kernel is printed (`step_summary`)."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from llama.api import Llama

    out.mkdir(parents=True, exist_ok=True)
    prompt = [torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()]
    sampling_of = {"greedy": {"temperature": 0.0, "top_k": None}, "sample": {"temperature": 0.8, "top_k": 200}}
    modes = {mode: sampling_of[mode] for mode in order.split(",")}
    llm = Llama(model, max_seq_len=1024, compile=True)
    llm.eos_token_ids = []
    for mode, sampling in modes.items():
        tok_s, = time_ours(llm, prompt, 256, sampling)
        s = llm.stats
        print(f"timeline {mode}: {tok_s:.1f} tok/s; first token after {s.prefill_seconds * 1e3:.1f} ms, then "
              f"{s.decode_seconds / (s.new_tokens - 1) * 1e3:.3f} ms per token", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompt, max_new_tokens=256, **sampling)
            torch.cuda.synchronize()
        path = out / f"trace_{mode}.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
        path.unlink()
        gpu = sorted(([e["name"], e["ts"], e["dur"]] for e in events
                      if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e[1])
        with gzip.open(out / f"timeline_{mode}.json.gz", "wt") as f:
            json.dump(gpu, f)
        busy = sum(e[2] for e in gpu)
        span = gpu[-1][1] + gpu[-1][2] - gpu[0][1]
        print(f"timeline {mode}: {len(gpu)} GPU activities, busy {busy / 1e3:.2f} ms of {span / 1e3:.2f} ms",
              flush=True)
        step_summary(gpu, 255)


def step_summary(gpu: list, steps: int) -> None:
    """Per decode step: each kernel name's launches and microseconds (totals over the call / `steps`; kernels that
    run less than once a step, the prefill's, are left out), and the idle time between activities."""
    totals: dict[str, list] = {}
    for name, _, duration in gpu:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += duration
    ends = [start + duration for _, start, duration in gpu]
    gaps = sum(max(0.0, start - end) for (_, start, _), end in zip(gpu[1:], ends))
    rows = sorted(((n / steps, us / steps, name) for name, (n, us) in totals.items() if n >= 0.9 * steps),
                  reverse=True, key=lambda row: row[1])
    print(f"per step: {sum(r[0] for r in rows):.0f} launches, {sum(r[1] for r in rows):.1f} us busy, "
          f"{gaps / steps:.1f} us of gaps (whole call / {steps})")
    for launches, us, name in rows:
        print(f"  {launches:6.1f} x {us / launches:7.2f} us = {us:8.1f} us  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch1", action="store_true", help="only the batch-1 experiments")
    parser.add_argument("--long", action="store_true", help="only the 32k and 128k long-context rows")
    parser.add_argument("--timeline", type=Path, help="only the batch-1 timeline, written to this folder")
    parser.add_argument("--modes", default="greedy,sample", help="the timeline's modes, in this order")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the timeline's model quantized")
    parser.add_argument("--group-size", type=int, default=64, help="int4's group size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an Inductor setting to try, e.g. triton.enable_pdl=True (repeatable)")
    args = parser.parse_args()
    for setting in args.set:
        key, value = setting.split("=", 1)
        *parents, name = key.split(".")
        section = torch._inductor.config
        for parent in parents:
            section = getattr(section, parent)
        setattr(section, name, ast.literal_eval(value))
    if args.timeline:
        config = ModelConfig.from_file(CONFIGS / "llama-3.1-8b.json")
        model = random_engine_model(config, torch.device("cuda"), torch.bfloat16)
        if args.quantize:
            from llama import quant

            group_size = args.group_size if args.quantize == "int4" else None
            model = quant.quantize_model(model, quant.QuantizationConfig.make(args.quantize, group_size))
        timeline(model, args.timeline / (args.quantize or "bf16"), args.modes)
        return
    if args.long:
        config = ModelConfig.from_file(CONFIGS / "llama-3.1-8b.json")
        long_context(random_engine_model(config, torch.device("cuda"), torch.bfloat16), config)
        return
    if args.batch1:
        config = ModelConfig.from_file(CONFIGS / "llama-3.1-8b.json")
        batch1(random_engine_model(config, torch.device("cuda"), torch.bfloat16), config)
        return
    torch._inductor.config.coordinate_descent_tuning = False
    config = ModelConfig.from_file(CONFIGS / "llama-3.1-8b.json")
    model = random_engine_model(config, torch.device("cuda"), torch.bfloat16)
    step_bytes = weight_bytes(model)
    rows = {}
    rows["eager"] = step_time(model, 1, 384, None)
    rows["reduce-overhead"] = step_time(model, 1, 384, "reduce-overhead")
    torch._dynamo.reset()
    torch._inductor.config.coordinate_descent_tuning = True
    rows["reduce-overhead + coordinate descent"] = step_time(model, 1, 384, "reduce-overhead")
    torch._inductor.config.coordinate_descent_tuning = False
    torch._dynamo.reset()
    peak = matmul_flops(torch.device("cuda"))
    seconds, share = prefill_efficiency(model, 8192, peak)
    print(f"prefill 8192 tokens: {seconds:.3f} s, {share:.0%} of the measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s", flush=True)
    long_context(model, config)
    for batch in (16, 64):
        torch._dynamo.reset()
        rows[f"reduce-overhead, batch {batch}"] = step_time(model, batch, 384, "reduce-overhead") / batch
    torch._dynamo.reset()
    one_row_linears(model, multiply_and_sum)
    torch._inductor.config.coordinate_descent_tuning = True
    rows["multiply-and-sum GEMV + coordinate descent"] = step_time(model, 1, 384, "reduce-overhead")
    for name, seconds in rows.items():
        print(f"decode step batch 1 | {name:45s} | {seconds * 1e3:7.3f} ms | {1 / seconds:6.1f} tok/s | "
              f"{step_bytes / seconds / 1e9:6.0f} GB/s of weights", flush=True)
    for context in (32768, 131072):
        for name, (seconds, bandwidth) in attention_variants(context).items():
            print(f"attention, one layer, context {context} | {name:32s} | {seconds * 1e6:8.1f} us | "
                  f"{bandwidth:6.0f} GB/s of KV", flush=True)
    print(json.dumps({k: v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
