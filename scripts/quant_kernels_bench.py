"""The weight-only quantized kernels (llama/quant_kernels.py) against bf16 F.linear and torch's own weight-only
kernels, alone, at the Llama-3.1-8B and 70B projection shapes and 1, 16 and 64 rows, on one GPU:

    python scripts/quant_kernels_bench.py            # the table (1-2 minutes on an H100, mostly compiling)
    python scripts/quant_kernels_bench.py --sweep    # + a grid of launch configs per shape and row count
    python scripts/quant_kernels_bench.py --shapes "down 8B,o 70B" --rows 1,16   # some shapes and row counts
    python scripts/quant_kernels_bench.py --sweep --warm 12 --out DIR   # compile in 12 processes first; files
    python scripts/quant_kernels_bench.py --before OLD.py   # + the kernels of another copy of the module

Each time is replayed from a CUDA graph that cycles through copies of the weights spanning >= 256 MiB, so that no
weight is served from the 50 MB L2 cache. GB/s counts the bytes of weights, scales and minimums read once per
call; "%" is that over the rate of a 1 GiB device-to-device copy (bytes read + written) measured in the same run.
The error is max |y - ref| / max |ref| over the row counts, ref = x @ w^T in float32 with w the dequantized weight
rounded to bf16 (what F.linear on the dequantized weight multiplies by); bf16 F.linear's own row shows the bf16
rounding of its output alone. A non-finite output counts as an infinite error, and " !" flags errors over 1e-2.

Methods: bf16 F.linear (cuBLAS), int8_linear, int4_linear at group sizes 64 and 128, torch._weight_int8pack_mm
and tinygemm's torch._weight_int4pack_mm (group 128, innerKTiles 8, weights repacked into its layout), the last two
where this torch build has them for CUDA (--no-torch-ops leaves them out). The sweep times, per (kernel, shape,
rows), every config of a grid around `default_config`, checks each one's output against the reference, and
prints the default's time and the best config's; --out DIR writes every config's time to DIR/sweep.txt.
--before FILE times the int8 and int4 ops of another version of llama/quant_kernels.py (e.g. `git show
HEAD~1:llama/quant_kernels.py > OLD.py`) beside ours, in the same run, with their own default configs. --norm
has our kernels normalise x first (the RMSNorm inside the one-row kernel, as a batch-1 decode step's qkv and
gate_up products do: `quant.fuse_gpu_decode`), beside the same kernels without it, and sweeps those.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth  # noqa: E402
from decode_variants import graph_time  # noqa: E402

from llama.model import rms_norm  # noqa: E402
from llama.quant_kernels import default_config, int4_linear, int8_linear  # noqa: E402

SHAPES = [  # name, N, K, whether int4 applies (the engine keeps the output projection in int8)
    ("qkv 8B", 6144, 4096, True), ("o 8B", 4096, 4096, True), ("gate_up 8B", 28672, 4096, True),
    ("down 8B", 4096, 14336, True), ("output 8B", 128256, 4096, False),
    ("qkv 70B", 10240, 8192, True), ("o 70B", 8192, 8192, True), ("gate_up 70B", 57344, 8192, True),
    ("down 70B", 8192, 28672, True),
]
CYCLE_BYTES = 256 * 2**20
dev, bf16 = torch.device("cuda"), torch.bfloat16
def copies(nbytes: int) -> int:
    return max(2, math.ceil(CYCLE_BYTES / nbytes))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def int8_weights(N: int, K: int, n: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q int8 [N, K], scale bf16 [N]) copies, as quantize_int8 makes them: q in -127..127, scale ~ max|w| / 127."""
    return [(torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev),
             (torch.rand(N, device=dev) * 0.02 + 0.01).to(bf16) / 127) for _ in range(n or copies(N * K + 2 * N))]


def int4_weights(N: int, K: int, G: int, n: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(qweight uint8 [N, K/2], scales, mins bf16 [N, K/G]) copies: q in 0..15, w in about [-0.04, 0.04]."""
    per_copy = N * K // 2 + 4 * N * (K // G)
    return [(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev),
             (torch.rand(N, K // G, device=dev) * 0.002 + 0.004).to(bf16),
             (-torch.rand(N, K // G, device=dev) * 0.01 - 0.03).to(bf16)) for _ in range(n or copies(per_copy))]


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
    if not torch.isfinite(y).all():
        return math.inf
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


class Method:
    """One way to multiply: a call on (x, one copy of the weights), the copies, the bytes a call reads, and the
    dequantized weight (bf16) its error is measured against; `bits` and `group` name the config grid it sweeps
    (bits 0: no grid)."""

    def __init__(self, name, call, weights, nbytes, dequantized, bits=0, group=0, norm=None):
        self.name, self.call, self.weights, self.nbytes, self.dequantized = name, call, weights, nbytes, dequantized
        self.bits, self.group, self.norm = bits, group, norm  # norm: the RMSNorm weight the call applies to x first

    def time(self, x: torch.Tensor, **config) -> float:
        return graph_time([lambda w=w: self.call(x, w, **config) for w in self.weights], repeat=20)

    def error(self, x: torch.Tensor, **config) -> float:
        normed = x.float() if self.norm is None else rms_norm(x.float(), self.norm.float(), 1e-5)
        ref = normed @ self.dequantized.float().T
        return max_error(self.call(x, self.weights[0], **config), ref)


def load_before(path: str):
    """Another version of llama/quant_kernels.py as a module, its ops registered as llama_before::*."""
    source = Path(path).read_text().replace('"llama::', '"llama_before::')
    copy = Path(tempfile.mkdtemp()) / "quant_kernels_before.py"
    copy.write_text(source)  # (Triton reads a kernel's source from its file)
    spec = importlib.util.spec_from_file_location("quant_kernels_before", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def methods_for(N: int, K: int, with_int4: bool, torch_ops: bool, notes: list[str], before=None,
                norm: bool = False) -> list[Method]:
    """Every method at one shape; `before`: the module of --before, whose ops join them; `norm`: our kernels
    apply an RMSNorm to x first (as a decode step's qkv and gate_up products do), beside the same kernels without
    it."""
    q8 = int8_weights(N, K)
    deq8 = (q8[0][0].float() * q8[0][1].float()[:, None]).to(bf16)
    dense = [torch.randn(N, K, device=dev, dtype=bf16) * 0.02 for _ in range(copies(2 * N * K))]
    dense[0] = deq8
    methods = [
        Method("bf16 F.linear", lambda x, w: F.linear(x, w), dense, nbytes(dense[0]), deq8),
        Method("int8_linear", lambda x, w, **c: int8_linear(x, *w, **c), q8, nbytes(*q8[0]), deq8, bits=8),
    ]
    if norm:
        g = torch.rand(K, device=dev, dtype=bf16) + 0.5
        methods[1] = Method("int8 norm inside", lambda x, w, **c: int8_linear(x, *w, norm_weight=g, eps=1e-5, **c),
                            q8, nbytes(*q8[0]), deq8, bits=8, norm=g)
        methods.append(Method("int8 without norm", lambda x, w: int8_linear(x, *w), q8, nbytes(*q8[0]), deq8))
    if before is not None:
        methods.append(Method("int8 before", lambda x, w: before.int8_linear(x, *w), q8, nbytes(*q8[0]), deq8))
    if torch_ops:
        methods.append(Method("int8 torch", lambda x, w: torch._weight_int8pack_mm(x, *w), q8, nbytes(*q8[0]), deq8))
    if with_int4:
        for G in (64, 128):
            q4 = int4_weights(N, K, G)
            deq4 = dequantize_int4(*q4[0], G).to(bf16)
            if norm:
                methods.append(Method(f"int4 g{G} norm inside", lambda x, w, G=G, **c: int4_linear(
                    x, *w, G, norm_weight=g, eps=1e-5, **c), q4, nbytes(*q4[0]), deq4, bits=4, group=G, norm=g))
                methods.append(Method(f"int4 g{G} without norm", lambda x, w, G=G: int4_linear(x, *w, G), q4,
                                      nbytes(*q4[0]), deq4))
                continue
            methods.append(Method(f"int4_linear g{G}", lambda x, w, G=G, **c: int4_linear(x, *w, G, **c), q4,
                                  nbytes(*q4[0]), deq4, bits=4, group=G))
            if before is not None:
                methods.append(Method(f"int4 g{G} before", lambda x, w, G=G: before.int4_linear(x, *w, G), q4,
                                      nbytes(*q4[0]), deq4))
        if torch_ops:
            try:
                tiny = tinygemm_weights(q4, 128)
                methods.append(Method("int4 tinygemm g128",
                                      lambda x, w: torch._weight_int4pack_mm(x, w[0], 128, w[1]), tiny,
                                      nbytes(*tiny[0]), deq4))
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
    flag = " !" if errors and not max(errors) <= 1e-2 else ""
    return f"{method.name:<19}|" + " |".join(cells) + f" |{error}{flag}"


def sweep_grid(bits: int, M: int, group: int = 0) -> list[dict[str, int]]:
    """Configs around the default: tile shapes, warps, pipeline depth, split-K (0: default_config's choice)."""
    if bits == 8:
        if M == 1:
            return [dict(block_m=1, block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=sk)
                    for bn, k, w, s, sk in [(16, 1024, 4, 3, 0), (8, 1024, 2, 3, 0), (16, 512, 4, 3, 0),
                                            (32, 512, 4, 3, 0), (16, 1024, 4, 4, 0), (16, 512, 4, 3, 2),
                                            (32, 1024, 4, 3, 0), (16, 2048, 4, 3, 0), (32, 1024, 8, 3, 0),
                                            (8, 2048, 4, 3, 0), (16, 1024, 4, 3, 2)]]
        if M > 64:  # a prefill's rows: 64 or 128 rows of x a block
            return [dict(block_m=bm, block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=0)
                    for bm, bn, k, w, s in [(64, 64, 128, 4, 4), (128, 64, 128, 4, 4), (128, 64, 128, 4, 3),
                                            (128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                            (64, 128, 128, 8, 4), (128, 128, 128, 8, 4), (128, 256, 64, 8, 3)]]
        return [dict(block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=sk)
                for bn, k, w, s, sk in [(64, 128, 4, 4, 0), (64, 256, 4, 4, 0), (128, 128, 8, 4, 0),
                                        (64, 256, 4, 3, 0), (64, 128, 4, 4, 8)]]
    if M == 1:  # int4, the CUDA-core gemvs: persistent (programs a SM; K <= 16384), then blocked
        return [dict(block_m=1, block_n=bn, num_warps=w, num_stages=s, programs=p)
                for bn, w, s, p in [(4, 4, 3, 3), (4, 4, 3, 2), (4, 4, 3, 4), (2, 4, 3, 3), (8, 4, 3, 2),
                                    (4, 8, 3, 3), (4, 4, 4, 3), (2, 4, 4, 2)]] + \
               [dict(block_m=1, block_n=bn, block_k=k, num_warps=w, num_stages=s, split_k=sk)
                for bn, k, w, s, sk in [(16, 1024, 4, 3, 0), (32, 1024, 4, 3, 0), (64, 1024, 4, 3, 0),
                                        (16, 2048, 4, 3, 0), (32, 2048, 4, 3, 0), (32, 1024, 8, 3, 0),
                                        (32, 512, 4, 4, 0), (16, 1024, 4, 4, 0), (8, 2048, 4, 3, 0),
                                        (16, 1024, 4, 3, 2), (32, 1024, 4, 3, 2)]]
    # int4: the tensor-core kernel, with 1-2 warps (mma.sync) or 4-8 (wgmma), two groups a step (block_k = 2 G)
    if M > 64:  # a prefill's rows: 64 or 128 rows of x a block
        return [dict(block_m=bm, block_n=bn, block_k=2 * group, num_warps=w, num_stages=s, split_k=0)
                for bm, bn, w, s in [(64, 64, 2, 3), (64, 128, 4, 3), (128, 64, 2, 3), (128, 64, 4, 3),
                                     (128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3)]]
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    mma = [(32, 1, 3), (32, 1, 4), (64, 1, 3), (64, 2, 3), (64, 2, 4), (128, 2, 3)]
    wgmma = [(128, 4, 3), (256, 4, 3)]
    if bm == 64:  # [n, 64] float32 accumulators: fewer rows a warp
        mma, wgmma = [(32, 1, 3), (64, 2, 3)], [(64, 4, 4), (128, 4, 3), (128, 8, 4)]
    grid = [dict(block_m=bm, block_n=bn, block_k=2 * group, num_warps=w, num_stages=s, split_k=sk)
            for bn, w, s in mma + wgmma for sk in ((0, 1, 2, 4) if bm == 16 else (0, 1, 2))]
    if group >= 128:  # a step of one group: one 2-byte scale per row
        grid.append(dict(block_m=bm, block_n=64, block_k=group, num_warps=2, num_stages=3, split_k=0))
    return grid


SHORT = {"block_m": "m", "block_n": "n", "block_k": "k", "num_warps": "warps", "num_stages": "stages",
         "split_k": "split"}


def describe(config: dict) -> str:
    return " ".join(f"{SHORT.get(key, key)}={value}" for key, value in config.items())


def sweep(method: Method, shape: str, N: int, K: int, xs: dict, sms: int, log: list[str]) -> list[str]:
    """Per row count: the default config's time and the best of the grid (each config's output checked)."""
    lines = []
    for M, x in xs.items():
        default = default_config(method.bits, M, N, K, sms, method.group, norm=method.norm is not None)
        timed = []
        for overrides in sweep_grid(method.bits, M, method.group):
            config = overrides
            try:  # (a config may not apply: e.g. the persistent gemv past K = 16384)
                config = default_config(method.bits, M, N, K, sms, method.group, norm=method.norm is not None,
                                        **overrides)
                error = method.error(x, **config)
                seconds = method.time(x, **config) if error <= 1e-2 else math.inf
            except Exception as e:  # e.g. out of shared memory: skip that config
                error, seconds = math.nan, math.inf
                config = config | {"error": f"{type(e).__name__}: {str(e)[:80]}"}
            timed.append((seconds, config))
            log.append(f"{method.name:<16} {shape:<11} M={M:<2} {seconds * 1e6:8.1f} us  error {error:.1e}  "
                       f"{describe(config)}")
        base = method.time(x, **default)
        best, config = min(timed, key=lambda t: t[0])
        lines.append(f"{method.name:<16} {shape:<11} M={M:<2} default {base * 1e6:7.1f} us | best {best * 1e6:7.1f} "
                     f"us ({100 * (best / base - 1):+4.0f}%) {describe(config)}")
    return lines


def warm_calls(rows: list[int]) -> list[list[tuple]]:
    """Every (bits, rows, group, config) that the sweep and the table launch, grouped by the kernel it compiles:
    Triton specializes on dtypes, on which integers are 1 or multiples of 16 (every shape here) and on the config,
    so running these on a small product (`warm_call`) fills its on-disk cache with the kernels of the real shapes."""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    groups: dict[tuple, list] = {}
    for M in rows:
        for bits, G in ((4, 64), (4, 128), (8, 0)):
            for overrides in [{}] + sweep_grid(bits, M, G):
                config = default_config(bits, M, 4096, 4096, sms, G, **overrides)
                kernel = (bits, G, M == 1) + tuple(v for key, v in config.items() if key != "split_k")
                groups.setdefault(kernel, []).append((bits, M, G, config))
    return list(groups.values())


def warm_call(bits: int, M: int, G: int, config: dict) -> None:
    x = torch.randn(M, 4096, device=dev, dtype=bf16)
    if bits == 4:
        int4_linear(x, *int4_weights(4096, 4096, G, n=1)[0], G, **config)
    else:
        int8_linear(x, *int8_weights(4096, 4096, n=1)[0], **config)


def warm_cache(workers: int, rows: list[int]) -> str:
    """Compile every kernel of the run in `workers` processes at once (this script with --warm-worker i/n)."""
    start = time.perf_counter()
    args = [sys.executable, __file__, "--rows", ",".join(map(str, rows))]
    procs = [subprocess.Popen(args + ["--warm-worker", f"{i}/{workers}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    failed = [out[-500:] for out, proc in ((p.communicate(timeout=200)[0], p) for p in procs) if proc.returncode]
    message = f"compiled in {workers} processes: {time.perf_counter() - start:.0f} s"
    return message + "".join(f"\nwarm worker failed: {tail}" for tail in failed)


def edge_check() -> str:
    """int4_linear at ragged shapes (N, K and M that no tile divides, an odd number of groups) in bf16, fp16 and
    fp32, against x @ w^T with w dequantized in float32 and rounded to x's dtype: the worst error per dtype."""
    cases = [(1, 1000, 4160, 64), (3, 200, 4096, 32), (17, 4096, 4096, 128), (33, 520, 1280, 256), (64, 136, 4160, 64)]
    worst = {}
    for dtype in (bf16, torch.float16, torch.float32):
        for M, N, K, G in cases:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            qweight, scales, mins = int4_weights(N, K, G, n=1)[0]
            scales, mins = scales.to(dtype), mins.to(dtype)
            ref = x.float() @ dequantize_int4(qweight, scales, mins, G).to(dtype).float().T
            error = max_error(int4_linear(x, qweight, scales, mins, G), ref)
            worst[dtype] = max(worst.get(dtype, 0.0), error)
    return "int4_linear at ragged shapes, worst error: " + ", ".join(f"{str(d)[6:]} {e:.1e}" for d, e in worst.items())


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
    parser.add_argument("--rows", default="1,16,64", help="comma-separated row counts (default 1,16,64)")
    parser.add_argument("--no-torch-ops", action="store_true", help="leave out torch's int8 op and tinygemm")
    parser.add_argument("--no-checks", action="store_true", help="skip the ragged-shape and torch.compile checks")
    parser.add_argument("--warm", type=int, default=0, help="compile every kernel first, in this many processes")
    parser.add_argument("--warm-worker", default="", help=argparse.SUPPRESS)  # i/n: compile every n-th call
    parser.add_argument("--out", default="", help="a folder for the full sweep (sweep.txt) and the table")
    parser.add_argument("--before", default="", help="another version of llama/quant_kernels.py to time beside")
    parser.add_argument("--norm", action="store_true", help="our kernels normalise x first (RMSNorm inside), "
                        "beside the same kernels without it")
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    rows = [int(r) for r in args.rows.split(",")]
    if args.warm_worker:
        i, n = map(int, args.warm_worker.split("/"))
        for group in warm_calls(rows)[i::n]:
            for call in group:
                warm_call(*call)
        torch.cuda.synchronize()
        return
    start = time.perf_counter()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    if args.warm:
        print(warm_cache(args.warm, rows), flush=True)
    notes: list[str] = []
    for check in () if args.no_checks else (edge_check, compiled_check):
        try:
            print(check(), flush=True)
        except Exception as e:  # printed now: a run stopped by a time limit still shows it
            print(f"note: {check.__name__}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    header = " |".join(f"{f'M={M}: us':>8} {'GB/s':>5} {'%':>4}" for M in rows)
    table = [f"\n{'shape':<11} {'N':>6} {'K':>6} {'method':<19}|{header} |   error"]
    print(table[0], flush=True)
    sweeps, log = [], []
    chosen = {name.strip() for name in args.shapes.split(",") if name.strip()}
    for shape, N, K, with_int4 in SHAPES:
        if chosen and shape not in chosen:
            continue
        methods = methods_for(N, K, with_int4, not args.no_torch_ops, notes, before, args.norm)
        xs = {M: torch.randn(M, K, device=dev, dtype=bf16) for M in rows}
        for i, method in enumerate(methods):
            label = f"{shape:<11} {N:6d} {K:6d}" if i == 0 else " " * 25
            table.append(f"{label} {measure(method, xs, bandwidth, notes)}")
            print(table[-1], flush=True)
        if args.sweep:
            for method in methods:
                if method.bits:
                    sweeps += sweep(method, shape, N, K, xs, sms, log)
                    print("\n".join(sweeps[-len(xs):]), flush=True)
        del methods, xs
        torch.cuda.empty_cache()
        if args.out:  # after each shape, so that a run stopped early still leaves what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "table.txt").write_text("\n".join(table) + "\n")
            (Path(args.out) / "sweep.txt").write_text("\n".join(log + [""] + sweeps) + "\n")
    print("\n".join(table))
    if sweeps:
        print("\nsweep (default_config's time, then the best config of its grid):")
        print("\n".join(sweeps))
    for note in notes:
        print(f"note: {note}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
