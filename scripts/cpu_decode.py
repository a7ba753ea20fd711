"""CPU decode speed of the engine on the SmolLM2 demo model, 2 threads: dense, int8 or int4, eager or compiled.

    python scripts/cpu_decode.py                          # float32, eager
    python scripts/cpu_decode.py --quantize int8 --compile
    python scripts/cpu_decode.py --quantize int4 --group-size 32 --compile

    python scripts/cpu_decode.py --profile [--compile]   # where a decode step's time goes (torch.profiler)
    python scripts/cpu_decode.py --side-by-side N        # eager, compile=True, (un)fused blocks, one graph
    python scripts/cpu_decode.py --kernels               # the one-row products alone, over SmolLM2's matrices

Prints prefill and decode tok/s of 128 new tokens (after a 32-token warm-up, which also compiles); compare with
`../shared/tools/llama-cpp-anchor.sh bench` run just before or after, with nothing else using the CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama.api import Llama  # noqa: E402
from llama.demo_model import ensure_demo_model  # noqa: E402
from llama.generate import decode_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5, help="timed generations after the warm-up")
    parser.add_argument("--profile", action="store_true", help="profile 20 decode steps instead")
    parser.add_argument("--side-by-side", type=int, metavar="REPEATS",
                        help="time eager, compile=True (quantized: with the blocks fused and not) and the whole "
                             "step compiled as one graph, alternating")
    parser.add_argument("--kernels", action="store_true", help="time the one-row products alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernel_sweep()
        return
    if args.side_by_side:
        side_by_side(args.quantize, args.group_size, args.side_by_side)
        return
    llm = Llama.from_pretrained(ensure_demo_model(), device="cpu", progress=False, quantize=args.quantize,
                                group_size=args.group_size, compile=args.compile, max_seq_len=512)
    llm.eos_token_ids = []  # decode the full length
    prompt = "Write a short story about a robot who learns to paint."
    start = time.perf_counter()
    llm.generate(prompt, max_new_tokens=32)
    print(f"warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.profile:
        profile_decode(llm, steps=20)
        return
    name = f"{args.quantize or 'float32'}{f' g{args.group_size}' if args.group_size else ''}" \
           f"{' compiled' if args.compile else ''}"
    rates = []
    for _ in range(args.runs):
        llm.generate(prompt, max_new_tokens=args.new_tokens)
        print(f"{name}: {llm.stats.summary()}")
        rates.append(llm.stats.decoded_tokens / llm.stats.decode_seconds)
    print(f"{name}: decode {statistics.mean(rates):.1f} +- {statistics.pstdev(rates):.1f} tok/s (mean of {args.runs} "
          f"runs, as llama-bench reports; best {max(rates):.1f})")


def side_by_side(quantize: str | None, group_size: int | None, repeats: int, steps: int = 30) -> None:
    """Decode ms per token of several decode steps, each on its own copy of the model, run in turn `repeats` times
    (a slow spell of a shared machine then slows all; the best run of each counts): eager and `compile=True` (the
    layers and output projection compiled for one token), each with a quantized model's blocks as one C++ call
    (quant.fuse_cpu_decode, as loaded) and without, and `decode_step` compiled as one graph (one guard check a step
    instead of 31, but ~37 s of compilation on an empty Inductor cache)."""
    variants = {"eager": (False, True), "compile=True": (True, True), "one graph": (False, False)}
    if quantize:
        variants = {"eager, blocks unfused": (False, False), "compile=True, blocks unfused": (True, False),
                    **variants}
    steps_of = {}
    for name, (compile, fused) in variants.items():
        start = time.perf_counter()
        llm = Llama.from_pretrained(ensure_demo_model(), device="cpu", progress=False, quantize=quantize,
                                    group_size=group_size, compile=compile, max_seq_len=512)
        for block in llm.model.layers if not fused else ():
            block.forward = getattr(block.forward, "unfused", block.forward)
        step = torch.compile(decode_step, fullgraph=True) if name == "one graph" else llm._decode_step
        llm._ensure_cache(1, 40 + steps)
        with torch.inference_mode():
            llm.model(torch.arange(1, 41)[None], input_pos=torch.arange(40), logits_at=torch.tensor([39]))

        def run(llm=llm, step=step) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for position in range(40, 40 + steps):  # (one graph: a fixed span, so that it compiles once)
                    span = 256 if step is not llm._decode_step else position + 1
                    step(llm.model, torch.tensor([[42]]), torch.tensor([[position]]), True, span=span)
            return (time.perf_counter() - start) / steps

        run()
        steps_of[name] = run
        print(f"{name}: loaded, compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    best = dict.fromkeys(steps_of, float("inf"))
    for _ in range(repeats):
        for name, run in steps_of.items():
            best[name] = min(best[name], run())
    print(f"best of {repeats}, {steps} steps each: " + ", ".join(
        f"{name} {ms * 1e3:.2f} ms = {1 / ms:.1f} tok/s" for name, ms in best.items()))


def kernel_sweep(repeats: int = 8) -> None:
    """One-row products over the 120 matrices of SmolLM2's blocks in turn (random weights of its shapes: 107 M
    weights, more than the last-level cache holds, so they come from memory, as in a decode step): float32
    F.linear (MKL), the float32 sum Inductor compiles for model.Linear, and the C++ kernels of cpu_kernels.py in
    int8 and int4 (groups of 32 and 64). Best of `repeats` sweeps; GB/s counts every byte of weights and scales."""
    import torch.nn.functional as F

    from llama import cpu_kernels, quant

    ops = cpu_kernels.ops()
    assert ops is not None, "the CPU kernels could not be built"
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # qkv, o, gate_up, down; 30 layers
    torch.manual_seed(0)
    xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
    dense = [(torch.randn(n, k),) for n, k in shapes]
    summed = torch.compile(lambda x, w: (x[:, None, :] * w).sum(-1), dynamic=False)
    variants = [("float32 F.linear", lambda x, w: F.linear(x, w), dense),
                ("float32 sum, Inductor", summed, dense),
                ("int8 (ours)", ops.int8_linear, [quant.quantize_int8(w) for w, in dense])]
    for G in (32, 64):
        variants.append((f"int4 g{G} (ours)", lambda x, *t, G=G: ops.int4_linear(x, *t, G),
                         [quant.quantize_int4(w, G) for w, in dense]))
    for name, product, matrices in variants:
        size = sum(t.numel() * t.element_size() for tensors in matrices for t in tensors)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for (_, k), tensors in zip(shapes, matrices):
                product(xs[k], *tensors)
            best = min(best, time.perf_counter() - start)
        print(f"{name:22s} {best * 1e3:6.2f} ms for {size / 1e6:4.0f} MB: {size / best / 1e9:5.1f} GB/s")


def profile_decode(llm: Llama, steps: int) -> None:
    """The time of each kind of top-level operation of a decode step (greedy, one row, 40 tokens in the cache),
    under torch.profiler (which slows the many small operations a little), and the number of operations."""
    from torch.profiler import ProfilerActivity, profile

    llm.generate(list(range(1, 40)), max_new_tokens=steps)  # allocates the cache and compiles
    token, model = torch.tensor([[42]]), llm.model
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for position in range(40, 40 + steps):
            llm._decode_step(model, token, torch.tensor([[position]]), True, span=position + 1)
    top = [e for e in prof.events() if e.cpu_parent is None]  # (compiled code: one event per compiled region)
    calls, micros = Counter(e.name for e in top), Counter()
    for e in top:
        micros[e.name] += e.cpu_time_total
    print(f"threads {torch.get_num_threads()}; {len(top) / steps:.0f} top-level operations per step, "
          f"{sum(micros.values()) / steps / 1e3:.2f} ms per step in them")
    for name, total in micros.most_common(12):
        print(f"  {total / steps / 1e3:6.2f} ms  {calls[name] / steps:4.0f} x  {name[:90]}")


if __name__ == "__main__":
    main()
