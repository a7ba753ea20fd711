"""The weight-only quantized kernels (llama/quant_kernels.py) against the plain formula: the weight dequantized in
float64, then a float64 matmul. Run by Triton's interpreter on the CPU, in float32, bfloat16 and float16, through
every kernel path: the GEMV (block_m = 1), the tl.dot kernel (block_m >= 16), each with and without split-K, with
tiles that overhang K and N, and for int4 each way a step takes its scales (one group, two, one per unit).
Skipped where Triton is not installed (the CPU-only CI); on a GPU, scripts/quant_kernels_bench.py checks them in
bf16 at the Llama shapes (with the int4 dot kernel's PTX conversion, which the interpreter cannot run: here it
computes the same weights in float32) and at ragged shapes in bf16, fp16 and fp32.

Tolerance, per output: |y - ref| <= u |ref| + 1e-5 sum_k |x_k w_k|, where u is the unit roundoff of the output
dtype (2^-8 bfloat16, 2^-11 float16, 0 float32): one rounding of the result to x's dtype, plus float32 sums of
up to 520 terms (their error is ~sqrt(K) 2^-24 of the sum of magnitudes; a wrong weight or a lost group moves an
output by ~1e-2 of it). The dot kernels round each dequantized weight to x's dtype before tl.dot, as F.linear on
the dequantized weight would; for them the reference weight is rounded the same way (int8 values are exact)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Two bfloat16 faults of Triton 3.x's interpreter, mended to do what the GPU does: tl.dot multiplies bfloat16
# operands as their raw 16-bit patterns (create_dot hands numpy the uint16 storage; widened to float32 first here),
# and float32 -> bfloat16 truncates (rounded to nearest even here, as the GPU's cvt.rn does).
PRELUDE = """
import torch
import triton.language as tl
from triton.runtime import interpreter

Builder = interpreter.InterpreterBuilder
_create_dot, _cast_impl = Builder.create_dot, Builder.cast_impl
def _widened(builder, h):
    return _cast_impl(builder, h, tl.float32) if h.dtype.scalar == tl.bfloat16 else h
def _cast_rounding_to_nearest(builder, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        rounded = torch.from_numpy(src.data.reshape(-1)).to(torch.bfloat16).view(torch.uint16).numpy()
        return interpreter.TensorHandle(rounded.reshape(src.data.shape), tl.bfloat16)
    return _cast_impl(builder, src, dst_type)
Builder.create_dot = lambda self, a, b, d, *rest: _create_dot(self, _widened(self, a), _widened(self, b), d, *rest)
Builder.cast_impl = _cast_rounding_to_nearest

UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

def sums_slack(x, w, x16):
    \"\"\"[M, N]: what the float32 sums may be off by, 1e-5 sum_k |x_k w_k| (x16: plus the rounding of x to 16 bits,
    at most 2^-16 of the row's largest |x| per value, 1.6e-5 of it times sum_k |w_k|).\"\"\"
    slack = x.double().abs() @ w.abs().T
    if x16:
        slack += 1.6 * x.double().abs().amax(1, keepdim=True) * w.abs().sum(1)[None, :]
    return 1e-5 * slack

def check(y, x, w, dtype, case, x16=False, residual=None):
    \"\"\"y [M, N] against x [M, K] @ w [N, K]^T (+ residual) in float64, within the module docstring's tolerance
    (`sums_slack`).\"\"\"
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[0]), (case, y.dtype, y.shape)
    ref = x.double() @ w.T + (0 if residual is None else residual.double())
    excess = ((y.double() - ref).abs() - UNIT_ROUNDOFF[dtype] * ref.abs() - sums_slack(x, w, x16)).max().item()
    assert excess <= 0, (case, excess)

def check_swiglu(y, x, w, dtype, case, x16=False):
    \"\"\"y [M, N / 2] against silu(gate) * up of x @ w^T in float64 (gate its first N / 2 columns, up the rest).
    Each of gate and up may be off by `check`'s tolerance and by a rounding to the output's dtype (the tl.dot
    path rounds them before SwiGLU); that moves silu(gate) * up by at most 1.1 |up| e_gate + |silu(gate)| e_up
    (silu' <= 1.1), and its own rounding adds 2 u |result|.\"\"\"
    F = w.shape[0] // 2
    assert y.dtype == dtype and y.shape == (x.shape[0], F), (case, y.dtype, y.shape)
    full = x.double() @ w.T
    u = UNIT_ROUNDOFF[dtype]
    slack = sums_slack(x, w, x16) + u * full.abs()
    gate, up = full[:, :F], full[:, F:]
    ref = torch.nn.functional.silu(gate) * up
    bound = 1.1 * up.abs() * slack[:, :F] + torch.nn.functional.silu(gate).abs() * slack[:, F:] + 2 * u * ref.abs()
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, (case, excess)

def ends(M, N, K, dtype):
    \"\"\"A case's RMSNorm weight and residual, and normed(x, gemv): x as the product sees it, normalised by the
    formula in float64 for the GEMV (which normalises inside), rounded as llama.model.rms_norm rounds it for the
    tl.dot kernel (which takes x normalised).\"\"\"
    from llama.model import rms_norm
    g, residual = (torch.rand(K) + 0.5).to(dtype), torch.randn(M, N).to(dtype)
    def normed(x, gemv):
        if gemv:
            x = x.double()
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()
        return rms_norm(x, g, 1e-5)
    return dict(norm_weight=g, eps=1e-5, residual=residual), normed

torch.manual_seed(0)
"""

INT8 = PRELUDE + """
from llama.quant_kernels import int8_linear
cases = [  # (M, N, K, config): the path each exercises
    (1, 72, 96, {}),                                  # gemv, one step much wider than K
    (1, 200, 520, dict(block_k=128, split_k=3)),      # gemv, split-K, the last split short
    (3, 72, 200, dict(block_m=1)),                    # gemv over 3 rows
    (3, 72, 200, {}),                                 # dot (the default at M > 1), one 16-row block
    (16, 200, 256, dict(block_k=64, split_k=2)),      # dot, split-K
    (33, 72, 96, dict(block_m=32, block_k=32)),       # dot, two row blocks, the second one row
    (130, 72, 200, {}),                               # dot, a prefill's 128 x 128 tiles: two row blocks, K ragged
]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for M, N, K, config in cases:
        for with_ends in (False, True):  # with_ends: an RMSNorm before the product, a residual added after it
            x = torch.randn(M, K).to(dtype)
            q = torch.randint(-128, 128, (N, K), dtype=torch.int8)  # -128 too: the sign-bit flip must undo it
            scale = (torch.rand(N) * 0.02 + 0.001).to(dtype)
            gemv = config.get("block_m", 1 if M == 1 else 16) == 1
            extra, normed = ends(M, N, K, dtype) if with_ends else ({}, lambda x, gemv: x)
            y = int8_linear(x, q, scale, **extra, **config)
            check(y, normed(x, gemv), q.double() * scale.double()[:, None], dtype, (dtype, M, N, K, config, with_ends),
                  x16=gemv, residual=extra.get("residual"))
            if with_ends:  # the gate and up projection: the norm before, SwiGLU after
                del extra["residual"]
                y = int8_linear(x, q, scale, swiglu=True, **extra, **config)
                check_swiglu(y, normed(x, gemv), q.double() * scale.double()[:, None], dtype,
                             (dtype, M, N, K, config, "swiglu"), x16=gemv)
print("ok")
"""

INT4 = PRELUDE + """
from llama.quant_kernels import int4_linear
cases = [  # (M, N, K, G, config): the path each exercises
    (1, 72, 192, 64, {}),                                  # persistent gemv (the default at one row), K padded
    (1, 40, 4608, 64, {}),                                 # persistent gemv past K = 4096: 2 rows a block, K padded
    (3, 72, 512, 256, dict(block_m=1, programs=1)),        # persistent gemv over 3 rows, one program walks all
    (1, 72, 128, 32, {}),                                  # persistent gemv, groups of 32
    (1, 72, 512, 256, {}),                                 # gemv (groups of 256: the default), one step wider than K
    (1, 72, 256, 64, dict(block_k=64)),                    # gemv, one whole group a step
    (1, 200, 512, 128, dict(block_k=64, split_k=3)),       # gemv, half a group a step, split-K, last split short
    (3, 72, 512, 256, dict(block_m=1, block_k=512)),       # gemv over 3 rows, two groups a step
    (1, 72, 256, 64, dict(block_m=16)),                    # dot at one row: two groups a step, N past the tile
    (3, 72, 256, 32, {}),                                  # dot (the default at M > 1), group 32: a scale per unit
    (16, 200, 512, 128, dict(block_k=128, split_k=2)),     # dot, one group a step, split-K
    (16, 200, 512, 128, {}),                               # dot, groups of 128: 32 rows a program (16-bit x)
    (33, 72, 256, 64, dict(block_m=32, num_warps=4)),      # dot, two row blocks, the second one row
    (5, 40, 320, 64, dict(block_k=128)),                   # dot, K past the last step, an odd number of groups
    (2, 40, 384, 64, dict(block_k=256)),                   # dot, four groups a step: a scale per unit, K ragged
    (130, 72, 256, 128, {}),                               # dot, a prefill's 128-row tiles (wgmma), two row blocks
]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for index, (M, N, K, G, config) in enumerate(cases):
        for with_ends in (False, True) if index in (0, 1, 3, 4, 6, 7, 9) else (False,):  # as in int8, on 7 paths
            x = torch.randn(M, K).to(dtype)
            qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
            scales = (torch.rand(N, K // G) * 0.02 + 0.001).to(dtype)
            mins = (-torch.rand(N, K // G) * 0.15).to(dtype)
            gemv = config.get("block_m", 1 if M == 1 else 16) == 1
            extra, normed = ends(M, N, K, dtype) if with_ends else ({}, lambda x, gemv: x)
            y = int4_linear(x, qweight, scales, mins, G, **extra, **config)
            q = torch.stack([qweight & 15, qweight >> 4], dim=-1).view(N, K).double()  # low nibble first
            w = q * scales.double().repeat_interleave(G, 1) + mins.double().repeat_interleave(G, 1)
            w = w if gemv else w.float().to(dtype).double()
            check(y, normed(x, gemv), w, dtype, (dtype, M, N, K, G, config, with_ends), x16=gemv,
                  residual=extra.get("residual"))
            if with_ends:  # as in int8
                del extra["residual"]
                y = int4_linear(x, qweight, scales, mins, G, swiglu=True, **extra, **config)
                check_swiglu(y, normed(x, gemv), w, dtype, (dtype, M, N, K, G, config, "swiglu"), x16=gemv)
print("ok")
"""

# torch.export(strict=True) traces with Dynamo, as torch.compile(fullgraph=True) does, and runs each op's fake
# implementation (its output's shape and dtype) without launching anything, so it needs neither a GPU nor the
# interpreter. (tests/test_kernels.py checks each fake against the op's real output.)
TRACED = """
import torch
from llama.quant_kernels import int4_linear, int8_linear

class Layer(torch.nn.Module):
    def forward(self, x, q8, scale, q4, scales, mins):
        return int8_linear(x[:1], q8, scale) + int4_linear(x, q4, scales, mins, 64, split_k=2)[1:]

bf16 = torch.bfloat16
args = (torch.randn(2, 128, dtype=bf16), torch.zeros(40, 128, dtype=torch.int8), torch.rand(40, dtype=bf16),
        torch.zeros(40, 64, dtype=torch.uint8), torch.rand(40, 2, dtype=bf16), torch.rand(40, 2, dtype=bf16))
ops = [str(node.target) for node in torch.export.export(Layer(), args, strict=True).graph.nodes]
assert ops.count("llama.int8_linear.default") == ops.count("llama.int4_linear.default") == 1, ops
print("ok")
"""


def run(script: str, interpreter: bool = True) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
def test_int8_linear_matches_the_formula_on_every_path():
    run(INT8)


@needs_triton
def test_int4_linear_matches_the_formula_on_every_path():
    run(INT4)


@needs_triton
def test_both_ops_trace_whole_into_one_graph():
    """No graph break around either op; each is one node of the graph (opaque: the op launches its kernels)."""
    run(TRACED, interpreter=False)


@needs_triton
def test_default_config_takes_the_gemv_at_one_row_and_splits_k_only_for_idle_sms():
    from llama.quant_kernels import default_config

    H100 = 132  # SMs
    assert default_config(8, 1, 28672, 4096, H100) == dict(block_m=1, block_n=16, block_k=1024, split_k=1,
                                                           num_warps=4, num_stages=3, programs=0)
    # int4 at one row: the persistent gemv, all of K (rounded up to a power of two) a step
    assert default_config(4, 1, 28672, 4096, H100, 64) == dict(block_m=1, block_n=4, block_k=4096, split_k=1,
                                                               num_warps=4, num_stages=3, programs=3)
    assert default_config(4, 1, 4096, 14336, H100, 64) == dict(block_m=1, block_n=2, block_k=16384, split_k=1,
                                                               num_warps=4, num_stages=3, programs=2)
    assert default_config(4, 1, 4096, 28672, H100, 64)["programs"] == 0  # (x would not fit in registers)
    assert default_config(4, 1, 4096, 14336, H100, 32)["programs"] == 2  # groups of 32 as 64,
    assert default_config(4, 1, 6144, 4096, H100, 128)["programs"] == 3  # of 128 up to K = 4096,
    assert default_config(4, 1, 4096, 14336, H100, 128)["programs"] == 0
    assert default_config(4, 1, 6144, 4096, H100, 256)["programs"] == 0  # of 256 not
    assert default_config(4, 1, 4096, 28672, H100, 64)["block_k"] == 2048  # the blocked gemv: 1 KB of each row,
    assert default_config(4, 1, 28672, 4096, H100, 64, block_k=1024)["programs"] == 0  # (asked for)
    assert default_config(4, 1, 57344, 28672, H100, 64)["block_k"] == 1024  # half a KB from 8k rows on
    assert default_config(4, 1, 8192, 28672, H100, 64, norm=True)["block_k"] == 1024  # and with the norm inside,
    assert default_config(8, 1, 6144, 4096, H100, norm=True)["block_k"] == 512  # for int8 too
    assert default_config(8, 1, 1024, 8192, H100)["block_n"] == 8  # 64 blocks of 16 rows would idle half the SMs
    assert default_config(8, 16, 28672, 4096, H100)["split_k"] == 1  # 448 already
    assert [default_config(8, M, 4096, 4096, H100)["block_m"] for M in (2, 16, 17, 33, 64, 65, 200)] == \
        [16, 16, 32, 64, 64, 128, 128]
    # a prefill's rows, the sweep's best at 128 rows on the 8B shapes
    assert default_config(8, 128, 28672, 4096, H100) == dict(block_m=128, block_n=64, block_k=64, split_k=1,
                                                             num_warps=4, num_stages=4, programs=0)
    assert default_config(8, 1, 64, 256, H100)["split_k"] == 1  # too short a K to split


@needs_triton
def test_int4_dot_config_takes_two_warps_of_mma_sync_up_to_16_rows_and_two_programs_an_sm():
    from llama.quant_kernels import default_config

    H100 = 132  # SMs
    assert default_config(4, 16, 6144, 4096, H100, 64) == dict(block_m=16, block_n=64, block_k=128, split_k=4,
                                                               num_warps=2, num_stages=3, programs=0)  # 96 x 4
    assert default_config(4, 2, 28672, 4096, H100, 64)["split_k"] == 1  # 448 blocks already


@needs_triton
def test_int4_dot_config_steps_over_two_groups_and_fits_float32_x():
    from llama.quant_kernels import default_config

    H100 = 132  # SMs
    assert [default_config(4, 16, 4096, 4096, H100, G)["block_k"] for G in (32, 64, 128, 256)] == [64, 128, 256, 256]
    float32 = default_config(4, 16, 4096, 4096, H100, 128, x_itemsize=4)
    assert (float32["block_k"], float32["num_stages"]) == (128, 2)


@needs_triton
def test_int4_dot_config_keeps_mma_sync_for_small_groups_and_takes_wgmma_for_large_ones_from_17_rows():
    from llama.quant_kernels import default_config

    H100 = 132  # SMs
    assert [default_config(4, M, 4096, 4096, H100, 64)["num_warps"] for M in (16, 17, 64)] == [2, 2, 2]
    assert [default_config(4, M, 4096, 4096, H100, 128)["num_warps"] for M in (16, 17, 64)] == [1, 4, 4]
    # past 64 rows (a prefill), 128-row tiles for groups of 128, 64-row ones for groups of 64 (the 128-row sweep)
    assert [default_config(4, 128, 4096, 4096, H100, G)["block_m"] for G in (64, 128)] == [64, 128]
    # groups of 128 at 16 rows, the sweep's best on the 8B shapes: one warp, 32 rows a program, the same K splits
    configs = [default_config(4, 16, N, K, H100, 128) for N, K in ((6144, 4096), (4096, 4096), (28672, 4096),
                                                                   (4096, 14336))]
    assert [(c["block_n"], c["block_k"], c["split_k"]) for c in configs] == [(32, 256, 2), (32, 256, 4),
                                                                             (32, 256, 1), (32, 256, 4)]
    # the sweep's best at 64 rows, groups of 64, 8B shapes: the K splits that give every SM a program
    configs = [default_config(4, 64, N, K, H100, 64) for N, K in ((6144, 4096), (4096, 4096), (28672, 4096),
                                                                  (4096, 14336))]
    assert [(c["block_n"], c["block_k"], c["split_k"]) for c in configs] == [(64, 128, 2), (64, 128, 4),
                                                                             (64, 128, 1), (64, 128, 4)]
