"""A batch-1 decode step's chain of quantized kernels, without the rest of the model: per layer the qkv gemv with
the RMSNorm inside, the decode attention (and its combine), o + residual, gate_up with the norm and SwiGLU inside,
down + residual, as `quant.fuse_gpu_decode` runs them, for layers of the Llama-3.1-8B shape with random weights,
replayed from one CUDA graph. A fast proxy for end-to-end batch-1 speed when changing how the kernels start and
end (seconds to compile, where `scripts/bench.py` compiles the model for minutes):

    python scripts/decode_chain.py                          # int8 and int4 g64, with and without PDL, twice
    python scripts/decode_chain.py --formats int4 --pdl 1,0 --layers 16

Prints us a layer (best of 5 timings of 50 replays) and whether every replay gave the same output as the first
(with programmatic dependent launch a kernel that read its inputs too early would show here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama.kernels as kernels  # noqa: E402
from llama.config import ModelConfig  # noqa: E402
from llama.model import RotaryEmbedding  # noqa: E402
from llama.quant_kernels import int4_linear, int8_linear  # noqa: E402

dev, bf16 = torch.device("cuda"), torch.bfloat16
C, F, H, K, D, S = 4096, 14336, 32, 8, 128, 1024  # the 8B shape; S cache slots, of which POSITION + 1 are read
POSITION = 600
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama-3.1-8b.json"  # (its RoPE)


class Cache:  # what decode_attention reads of a KVCache
    def __init__(self):
        self.k = torch.randn(1, K, S, D, device=dev, dtype=bf16)
        self.v = torch.randn(1, K, S, D, device=dev, dtype=bf16)


def product(fmt: str, N: int, in_features: int):
    """A random quantized [N, in_features] layer as a function of x and the fused ends (norm, residual, swiglu)."""
    if fmt == "int8":
        q = torch.randint(-127, 128, (N, in_features), device=dev, dtype=torch.int8)
        scale = (torch.rand(N, device=dev) * 1e-3).to(bf16)
        return lambda x, **ends: int8_linear(x, q, scale, **ends)
    q = torch.randint(0, 256, (N, in_features // 2), device=dev, dtype=torch.uint8)
    scales = (torch.rand(N, in_features // 64, device=dev) * 1e-3).to(bf16)
    mins = (-torch.rand(N, in_features // 64, device=dev) * 8e-3).to(bf16)
    return lambda x, **ends: int4_linear(x, q, scales, mins, 64, **ends)


def chain(fmt: str, n_layers: int):
    layers = [dict(qkv=product(fmt, (H + 2 * K) * D, C), o=product(fmt, C, H * D), gate_up=product(fmt, 2 * F, C),
                   down=product(fmt, C, F), norm1=torch.rand(C, device=dev, dtype=bf16) + 0.5,
                   norm2=torch.rand(C, device=dev, dtype=bf16) + 0.5, cache=Cache()) for _ in range(n_layers)]
    rope = RotaryEmbedding(ModelConfig.from_hf_config(json.loads(CONFIG.read_text()))).to(dev)
    position = torch.tensor([[POSITION]], device=dev)
    x0 = torch.randn(1, C, device=dev, dtype=bf16)

    def step() -> torch.Tensor:
        x = x0
        for layer in layers:
            qkv = layer["qkv"](x, norm_weight=layer["norm1"], eps=1e-5)
            attended = kernels.decode_attention(qkv.view(1, 1, -1), layer["cache"], position, rope)
            h = layer["o"](attended.reshape(1, H * D), residual=x)
            x = layer["down"](layer["gate_up"](h, norm_weight=layer["norm2"], eps=1e-5, swiglu=True), residual=h)
        return x

    return step


def time_chain(step, n_layers: int) -> tuple[float, bool]:
    """(us a layer, best of 5 x 50 replays; whether every replay's output equals the first's). Its own CUDA graph
    rather than decode_variants.graph_time, which keeps neither the graph nor its output."""
    for _ in range(2):  # compile the kernels (and write the new cache slot) outside the graph
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    first = out.clone()
    times, same = [], True
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 50 * 1e3 / n_layers)
        same &= torch.equal(out, first)
    return min(times), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int8,int4", help="int8 and/or int4 (group 64)")
    parser.add_argument("--pdl", default="1,0,1,0", help="programmatic dependent launch on (1) or off (0), in turn")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers of the 8B shape, "
          f"position {POSITION}")
    for fmt in args.formats.split(","):
        step = chain(fmt, args.layers)
        for pdl in args.pdl.split(","):
            kernels.PDL = pdl == "1"
            us, same = time_chain(step, args.layers)
            print(f"{fmt:5} PDL {'on ' if kernels.PDL else 'off'}: {us:6.1f} us a layer; replays equal: {same}",
                  flush=True)


if __name__ == "__main__":
    main()
