"""The weight-only quantized kernels (llama/quant_kernels.py) against bf16 F.linear and torch's own weight-only
kernels, alone, at the Llama-3.1-8B and 70B projection shapes and 1, 16 and 64 rows, on one GPU:

    python scripts/quant_kernels_bench.py            # the table (1-2 minutes on an H100, mostly compiling)
    python scripts/quant_kernels_bench.py --sweep    # + a grid of launch configs per shape and row count (+1-2 min)
    python scripts/quant_kernels_bench.py --shapes "down 8B,o 70B"   # some shapes only

Each time is replayed from a CUDA graph that cycles through copies of the weights spanning >= 256 MiB, so that no
weight is served from the 50 MB L2 cache. GB/s counts the bytes of weights, scales and minimums read once per
call; "%" is that over the rate of a 1 GiB device-to-device copy (bytes read + written) measured in the same run.
The error is max |y - ref| / max |ref| over the three row counts, ref = x @ w^T in float32 with w the
dequantized weight rounded to bf16 (what F.linear on the dequantized weight multiplies by); bf16 F.linear's own
row shows the bf16 rounding of its output alone.

Methods: bf16 F.linear (cuBLAS), int8_linear, int4_linear at group sizes 64 and 128, torch._weight_int8pack_mm
and tinygemm's torch._weight_int4pack_mm (group 128, innerKTiles 8, weights repacked into its layout), the last two
where this torch build has them for CUDA. The sweep prints, per (kernel, shape, rows), the default config's time
and the best config of its grid, for fixing `default_config` in one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth  # noqa: E402
from decode_variants import graph_time  # noqa: E402

from llama.quant_kernels import default_config, int4_linear, int8_linear  # noqa: E402

SHAPES = [  # name, N, K, whether int4 applies (the engine keeps the output projection in int8)
    ("qkv 8B", 6144, 4096, True), ("o 8B", 4096, 4096, True), ("gate_up 8B", 28672, 4096, True),
    ("down 8B", 4096, 14336, True), ("output 8B", 128256, 4096, False),
    ("qkv 70B", 10240, 8192, True), ("o 70B", 8192, 8192, True), ("gate_up 70B", 57344, 8192, True),
    ("down 70B", 8192, 28672, True),
]
ROWS = (1, 16, 64)
CYCLE_BYTES = 256 * 2**20
dev, bf16 = torch.device("cuda"), torch.bfloat16


def copies(nbytes: int) -> int:
    return max(2, math.ceil(CYCLE_BYTES / nbytes))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def int8_weights(N: int, K: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q int8 [N, K], scale bf16 [N]) copies, as quantize_int8 makes them: q in -127..127, scale ~ max|w| / 127."""
    return [(torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev),
             (torch.rand(N, device=dev) * 0.02 + 0.01).to(bf16) / 127) for _ in range(copies(N * K + 2 * N))]


def int4_weights(N: int, K: int, G: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(qweight uint8 [N, K/2], scales, mins bf16 [N, K/G]) copies: q in 0..15, w in about [-0.04, 0.04]."""
    per_copy = N * K // 2 + 4 * N * (K // G)
    return [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev),
             (torch.rand(N, K // G, device=dev) * 0.002 + 0.004).to(bf16),
             (-torch.rand(N, K // G, device=dev) * 0.01 - 0.03).to(bf16)) for _ in range(copies(per_copy))]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, G: int) -> torch.Tensor:
    q = torch.stack([qweight & 15, qweight >> 4], dim=-1).view(qweight.shape[0], -1).float()  # low nibble first
    return q * scales.float().repeat_interleave(G, 1) + mins.float().repeat_interleave(G, 1)


def tinygemm_weights(int4: list, G: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our int4 copies in tinygemm's layout: even k in the high nibble, packed by _convert_weight_to_int4pack,
    and w = (q - 8) scale + zero, so zero = min + 8 scale, [K/G, N, 2] beside the scales."""
    out = []
    for qweight, scales, mins in int4:
        swapped = ((qweight & 15) << 4) | (qweight >> 4)
        zeros = (mins.float() + 8 * scales.float()).to(bf16)
        out.append((torch._convert_weight_to_int4pack(swapped, 8),
                    torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()))
    return out


def max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


class Method:
    """One way to multiply: a call on (x, one copy of the weights), the copies, the bytes a call reads, and the
    dequantized weight (bf16) its error is measured against."""

    def __init__(self, name, call, weights, nbytes, dequantized):
        self.name, self.call, self.weights, self.nbytes, self.dequantized = name, call, weights, nbytes, dequantized

    def time(self, x: torch.Tensor, **config) -> float:
        return graph_time([lambda w=w: self.call(x, w, **config) for w in self.weights], repeat=20)

    def error(self, x: torch.Tensor) -> float:
        ref = x.float() @ self.dequantized.float().T
        return max_error(self.call(x, self.weights[0]), ref)


def methods_for(N: int, K: int, with_int4: bool, notes: list[str]) -> list[Method]:
    q8 = int8_weights(N, K)
    deq8 = (q8[0][0].float() * q8[0][1].float()[:, None]).to(bf16)
    dense = [torch.randn(N, K, device=dev, dtype=bf16) * 0.02 for _ in range(copies(2 * N * K))]
    dense[0] = deq8
    methods = [
        Method("bf16 F.linear", lambda x, w: F.linear(x, w), dense, nbytes(dense[0]), deq8),
        Method("int8_linear", lambda x, w, **c: int8_linear(x, *w, **c), q8, nbytes(*q8[0]), deq8),
        Method("int8 torch", lambda x, w: torch._weight_int8pack_mm(x, *w), q8, nbytes(*q8[0]), deq8),
    ]
    if with_int4:
        for G in (64, 128):
            q4 = int4_weights(N, K, G)
            deq4 = dequantize_int4(*q4[0], G).to(bf16)
            methods.append(Method(f"int4_linear g{G}", lambda x, w, G=G, **c: int4_linear(x, *w, G, **c), q4,
                                  nbytes(*q4[0]), deq4))
        try:
            tiny = tinygemm_weights(q4, 128)
            methods.append(Method("int4 tinygemm g128", lambda x, w: torch._weight_int4pack_mm(x, w[0], 128, w[1]),
                                  tiny, nbytes(*tiny[0]), deq4))
        except Exception as e:  # report and go on: not every build has tinygemm for this GPU
            note = f"tinygemm unavailable: {type(e).__name__}: {str(e)[:150]}"
            if note not in notes:
                notes.append(note)
    return methods


def measure(method: Method, xs: dict[int, torch.Tensor], bandwidth: float, notes: list[str]) -> str:
    cells, errors = [], []
    for M, x in xs.items():
        try:
            seconds = method.time(x)
            errors.append(method.error(x))
            rate = method.nbytes / seconds
            cells.append(f"{seconds * 1e6:8.1f} {rate / 1e9:5.0f} {100 * rate / bandwidth:3.0f}%")
        except Exception as e:  # report (once a method) and go on: one failing method must not hide the others
            cells.append(f"{'failed':>19}")
            if not any(note.startswith(method.name + " ") for note in notes):
                notes.append(f"{method.name} M={M}: {type(e).__name__}: {str(e)[:150]}")
    error = f"{max(errors):8.1e}" if errors else "       -"
    flag = " !" if errors and max(errors) > 2e-2 else ""
    return f"{method.name:<19}|" + " |".join(cells) + f" |{error}{flag}"


def sweep_grid(bits: int, M: int) -> list[dict[str, int]]:
    """A few configs around the default: tile shapes, warps, pipeline depth, split-K."""
    if M == 1:
        bk = 8192 // bits  # the default: 1 KB of each row a step
        return [dict(block_m=1, block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=sk)
                for bn, k, w, s, sk in [(16, bk, 4, 3, 0), (8, bk, 2, 3, 0), (16, bk // 2, 4, 3, 0), (16, bk, 2, 3, 0),
                                        (32, bk // 2, 4, 3, 0), (32, bk, 8, 3, 0), (16, bk, 4, 2, 0), (16, bk, 4, 4, 0),
                                        (16, bk // 2, 4, 3, 2), (16, bk // 2, 4, 3, 4)]]
    return [dict(block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=sk)
            for bn, k, w, s, sk in [(64, 128, 4, 4, 0), (64, 256, 4, 4, 0), (64, 128, 4, 3, 0), (128, 128, 8, 4, 0),
                                    (32, 256, 4, 4, 0), (64, 256, 4, 3, 0), (64, 128, 4, 4, 1), (64, 128, 4, 4, 8)]]


SHORT = {"block_n": "n", "block_k": "k", "num_warps": "warps", "num_stages": "stages", "split_k": "split"}


def sweep(method: Method, bits: int, shape: str, N: int, K: int, xs: dict, sms: int) -> list[str]:
    lines = []
    for M, x in xs.items():
        default = default_config(bits, M, N, K, sms)
        timed = []
        for overrides in sweep_grid(bits, M):
            config = default_config(bits, M, N, K, sms, **overrides)
            try:
                timed.append((method.time(x, **config), config))
            except Exception as e:  # e.g. out of shared memory: skip that config
                timed.append((float("inf"), config | {"error": type(e).__name__}))
        base = method.time(x, **default)
        best, config = min(timed, key=lambda t: t[0])
        short = " ".join(f"{SHORT.get(key, key)}={value}" for key, value in config.items() if key != "block_m")
        lines.append(f"{method.name:<16} {shape:<11} M={M:<2} default {base * 1e6:7.1f} us | best {best * 1e6:7.1f} "
                     f"us ({100 * (best / base - 1):+4.0f}%) {short}")
    return lines


def compiled_check() -> str:
    """Both ops inside torch.compile(mode="reduce-overhead", fullgraph=True): one CUDA graph, same outputs."""
    q8 = torch.randint(-127, 128, (512, 4096), dtype=torch.int8, device=dev)
    scale = torch.rand(512, device=dev, dtype=bf16) * 1e-4
    q4 = torch.randint(0, 256, (512, 2048), dtype=torch.uint8, device=dev)
    scales = torch.rand(512, 64, device=dev, dtype=bf16) * 0.004
    mins = -torch.rand(512, 64, device=dev, dtype=bf16) * 0.03

    def layer(x):
        return int8_linear(x, q8, scale) + int4_linear(x, q4, scales, mins, 64)

    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    worst = 0.0
    for M in (1, 16):
        x = torch.randn(M, 4096, device=dev, dtype=bf16)
        for _ in range(3):  # the graph is recorded on the second or third call
            y = compiled(x)
        worst = max(worst, max_error(y, layer(x).float()))
    return f"torch.compile(mode='reduce-overhead', fullgraph=True) against eager: max error {worst:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configs for our kernels")
    parser.add_argument("--shapes", default="", help="comma-separated names to keep, e.g. 'down 8B,o 70B'")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    notes: list[str] = []
    try:
        print(compiled_check(), flush=True)
    except Exception as e:
        notes.append(f"compiled check: {type(e).__name__}: {str(e)[:300]}")
    header = " |".join(f"{f'M={M}: us':>8} {'GB/s':>5} {'%':>4}" for M in ROWS)
    print(f"\n{'shape':<11} {'N':>6} {'K':>6} {'method':<19}|{header} |   error", flush=True)
    sweeps = []
    chosen = {name.strip() for name in args.shapes.split(",") if name.strip()}
    for shape, N, K, with_int4 in SHAPES:
        if chosen and shape not in chosen:
            continue
        methods = methods_for(N, K, with_int4, notes)
        xs = {M: torch.randn(M, K, device=dev, dtype=bf16) for M in ROWS}
        for i, method in enumerate(methods):
            label = f"{shape:<11} {N:6d} {K:6d}" if i == 0 else " " * 25
            print(f"{label} {measure(method, xs, bandwidth, notes)}", flush=True)
        if args.sweep:
            for method in methods:
                if method.name in ("int8_linear", "int4_linear g128"):
                    sweeps += sweep(method, 8 if method.name == "int8_linear" else 4, shape, N, K, xs, sms)
        del methods, xs
        torch.cuda.empty_cache()
    if sweeps:
        print("\nsweep (block_n, block_k, warps, stages, split; default_config's choice first):")
        print("\n".join(sweeps))
    for note in notes:
        print(f"note: {note}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
