"""Triton kernels for weight-only quantized linear layers (llama/quant.py), reading its stored layout directly:

int8_linear   y[m, n] = scale[n] * sum_k x[m, k] q[n, k]                  q int8 [N, K], scale [N]
int4_linear   y[m, n] = sum_k x[m, k] (q[n, k] s[n, g] + mn[n, g])        g = k // G, q in 0..15 packed two a byte:
              qweight uint8 [N, K/2], q[n, 2j] = qweight[n, j] & 15, q[n, 2j+1] = qweight[n, j] >> 4; s, mn [N, K/G]

x is [M, K] in bf16, fp16 or fp32 (rows contiguous), scales in x's dtype, the output [M, N] in x's dtype; every
sum is accumulated in float32. Both are custom ops (`llama::int8_linear`, `llama::int4_linear`), so that inside a
compiled graph Inductor launches the kernels as they are.

Decoding reads every weight once per step, so these kernels are judged by the bytes of weights they stream per
second. Two kernels per format:

gemv   BLOCK_M = 1 (one row of x per program; the choice at M = 1). Program (n block, row m, K split): BLOCK_N
       weight rows, walked along K in steps of BLOCK_K features, with float32 partial products kept per element
       and summed once at the end. No tensor cores: at M = 1 there is nothing to gain from them.
dot    BLOCK_M >= 16 (M >= 2). Program (n block, m block, K split): each step dequantizes a [BLOCK_N, BLOCK_K]
       weight tile and multiplies it with tl.dot by the [BLOCK_M, BLOCK_K] tile of x, as y^T = W x^T (the weight
       tile is the dot's left operand, where Hopper's wgmma takes it from registers), so each weight is read once
       per BLOCK_M rows of x.

Unpacking. Weights are read as int32 words, 4 int8 or 8 int4 values each (the stored bytes, viewed), and a value
becomes a float without an int-to-float instruction (I2F, a quarter-rate instruction on an H100; at 3 TB/s an int4
GEMV needs 6e12 conversions/s, more than I2F's 4e12): it is ORed into the low mantissa bits of the float 2^23,
whose last place is worth 1, and 2^23 is subtracted (`_field`). In the GEMV the value is not even shifted down
first: a field at bit 4j comes out as q * 16^j, and x is scaled by 16^-j instead (exact: powers of two). That
leaves one integer instruction, one add and one fma per int4 weight.

int4 groups. In the GEMV the tip sum_k x_k w_k = s_g sum_k x_k q_k + mn_g sum_k x_k applies: each step sums
x_k q_k over each group of its tile before the scale and minimum are applied ([BLOCK_N, groups] values, not one
per weight). The dot kernel dequantizes w = q s + mn per weight (in float32, then rounded to x's dtype), which
lets BLOCK_K be larger than G.

Split-K. With SPLIT_K > 1 each program covers 1 / SPLIT_K of K and writes float32 partial sums [SPLIT_K, M, N];
a second small kernel adds them up. It only pays when there are too few n blocks to give every SM a program
(a small N: tensor-parallel shards, or the dot kernel's 64-row blocks at N = 4096); otherwise it adds a kernel.

Launch configs (`default_config`, no autotuning: a compiled graph must launch the same kernel every step, chosen
without timing anything; every knob can be overridden by keyword for a sweep, scripts/quant_kernels_bench.py):
  M = 1    gemv, BLOCK_K = 512 bytes of each row a step (512 int8 / 1024 int4 features: 32 threads x 16 bytes),
           BLOCK_N = 16 with 4 warps (4 rows a thread, so each x value loaded serves 4 rows), 3 pipeline stages
           (a loop without tl.dot is pipelined only when tl.range asks). BLOCK_N = 8 when N / 16 blocks would not
           fill the SMs.
  M >= 2   dot, BLOCK_M = 16 / 32 / 64 for M up to 16 / 32 / more, BLOCK_N = 64 (one wgmma tile), BLOCK_K =
           128 bytes of each row a step (128 int8 / 256 int4 features), 4 warps, 4 stages.
  both     SPLIT_K = the smallest power of two that gives at least one program per SM, while each split keeps
           at least 2 steps of BLOCK_K.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

CONFIG_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")


# ---------------------------------------------------------------------------- unpacking
@triton.jit
def _field(words, POS: tl.constexpr, BITS: tl.constexpr):
    """The BITS-wide field at bit POS of each int32 word, as float32 times 2^POS (POS + BITS <= 16): int8 fields
    signed (-128..127), int4 fields unsigned (0..15).

    2^23 has a unit in the last place of 1, so the float with bits 0x4B000000 | v is 2^23 + v for v < 2^23. A
    signed byte b (two's complement) with its sign bit flipped is b + 128 in 0..255, hence the 128 subtracted."""
    field = words & (((1 << BITS) - 1) << POS)
    if BITS == 8:
        return (field ^ (0x4B000000 | (0x80 << POS))).to(tl.float32, bitcast=True) - (8388608.0 + (128 << POS))
    else:
        return (field | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """int32 words [R, W] -> the 32 / BITS values packed in each, lowest bits first, as float32 [R, W, 32 / BITS]
    (value t of word i is feature 32 / BITS * i + t)."""
    shifts = tl.arange(0, 32 // BITS) * BITS
    return _field(words[:, :, None] >> shifts[None, None, :], 0, BITS)


@triton.jit
def _store(out_ptr, y, m, n, M, N, split):
    """y [BLOCK_N] or [BLOCK_N, BLOCK_M] -> out[split, m, n]: the output itself, or one split's float32 partials."""
    if len(y.shape) == 1:
        tl.store(out_ptr + (split * M + m) * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)
    else:
        tl.store(out_ptr + (split * M + m[None, :]) * N + n[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (m[None, :] < M))


# ---------------------------------------------------------------------------- int8
@triton.jit
def _x_lane(x_ptr, i, in_k, t: tl.constexpr, LANES: tl.constexpr):
    """x[LANES * i + t] of one row of x (x_ptr: that row) as float32 [len(i)].

    16-bit x is read as int32 pairs: 4-byte loads, which the loop pipeline copies ahead (cp.async takes 4 bytes
    or more), where 2-byte loads would be waited for in each step. Lanes t and t + 1 load the same pair (once)."""
    if x_ptr.dtype.element_ty == tl.float32:
        return tl.load(x_ptr + LANES * i + t, mask=in_k, other=0.0)
    pair = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + LANES // 2 * i + t // 2, mask=in_k, other=0)
    bits = (pair >> (16 * (t % 2))) & 0xFFFF
    if x_ptr.dtype.element_ty == tl.bfloat16:  # a bfloat16 is the top half of a float32
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (n block, row m, split): y[m, n] = scale[n] sum_k x[m, k] q[n, k] for BLOCK_N rows n over the split's
    K range. Word i of a row holds q[n, 4i + t] in byte t; acc[n, i] sums x[m, 4i + t] q[n, 4i + t] over t and the
    steps."""
    pid_n, m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW  # [BLOCK_N, 1]
    x_row = x_ptr + m * stride_x
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
    start = split * k_per_split
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 4), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # [BLOCK_K / 4] word index
        in_k = i < KW
        words = tl.load(w_rows + i[None, :], mask=(n[:, None] < N) & in_k[None, :], other=0)
        high = words >> 16
        for t in tl.static_range(4):  # byte t of each word: bytes 0, 1 in place, 2, 3 from the high half
            pos = 8 * (t % 2)
            q_t = _field(words if t < 2 else high, pos, 8)  # q * 256^(t % 2)
            x_t = _x_lane(x_row, i, in_k, t, 4)
            acc = tl.fma(q_t, (x_t * (1.0 / (1 << pos)))[None, :], acc)
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    _store(out_ptr, tl.sum(acc, axis=1) * scale, m, n, M, N, split)


@triton.jit
def _int8_dot_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (n block, m block, split): acc[n, m] = sum_k q[n, k] x[m, k] with tl.dot on dequantized tiles,
    y[m, n] = scale[n] acc[n, m]."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW
    x_rows = x_ptr + m[:, None] * stride_x
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    start = split * k_per_split
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 4), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # [BLOCK_K / 4]
        words = tl.load(w_rows + i[None, :], mask=(n[:, None] < N) & (i < KW)[None, :], other=0)
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = tl.load(x_rows + k[None, :], mask=(m[:, None] < M) & (k < KW * 4)[None, :], other=0.0)
        w = tl.reshape(_unpack(words, 8), [BLOCK_N, BLOCK_K]).to(x.dtype)  # int8 values are exact in bf16/fp16
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")  # "ieee": fp32 x without tf32 rounding
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    _store(out_ptr, acc * scale[:, None], m, n, M, N, split)


# ---------------------------------------------------------------------------- int4
@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x,
                      G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (n block, row m, split): y[m, n] over the split's K range for BLOCK_N rows n. Word i of a row holds
    q[n, 8i + t] in bits 4t..4t+3. A step covers GROUPS whole groups of G / 8 words, or part of one group
    (WORDS words); per group, y += s sum_k x_k q_k + mn sum_k x_k."""
    WORDS: tl.constexpr = min(BLOCK_K, G) // 8  # words of one group in a step
    GROUPS: tl.constexpr = BLOCK_K // (8 * WORDS)
    pid_n, m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = n < N
    NG = KW * 8 // G
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW  # [BLOCK_N, 1]
    x_row = x_ptr + m * stride_x
    total = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    start = split * k_per_split
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 8), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BLOCK_K / 8] word index
        in_k = i < KW
        words = tl.load(w_rows + i[None, :], mask=row_ok[:, None] & in_k[None, :], other=0)
        g = k0 // G + tl.arange(0, GROUPS)  # [GROUPS] group index
        ok = row_ok[:, None] & (g < NG)[None, :]
        s = tl.load(scales_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)  # [BLOCK_N, GROUPS]
        mn = tl.load(mins_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)
        high = words >> 16
        dots = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)  # [n, i]: sum_t x[8i + t] q[n, 8i + t]
        x_sum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for t in tl.static_range(8):  # nibble t of each word: 0-3 in place, 4-7 from the high half
            pos = 4 * (t % 4)
            q_t = _field(words if t < 4 else high, pos, 4)  # q * 16^(t % 4)
            x_t = _x_lane(x_row, i, in_k, t, 8)
            dots = tl.fma(q_t, (x_t * (1.0 / (1 << pos)))[None, :], dots)
            x_sum += x_t
        dots = tl.sum(tl.reshape(dots, [BLOCK_N, GROUPS, WORDS]), axis=2)  # [BLOCK_N, GROUPS]
        x_sum = tl.sum(tl.reshape(x_sum, [GROUPS, WORDS]), axis=1)  # [GROUPS]
        total += s * dots + mn * x_sum[None, :]
    _store(out_ptr, tl.sum(total, axis=1), m, n, M, N, split)


@triton.jit
def _int4_dot_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """Program (n block, m block, split): acc[n, m] = sum_k w[n, k] x[m, k] with tl.dot, w = q s + mn dequantized
    a [BLOCK_N, BLOCK_K] tile at a time."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = n < N
    NG = KW * 8 // G
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW
    x_rows = x_ptr + m[:, None] * stride_x
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    start = split * k_per_split
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 8), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BLOCK_K / 8]
        words = tl.load(w_rows + i[None, :], mask=row_ok[:, None] & (i < KW)[None, :], other=0)
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=(m[:, None] < M) & (k < KW * 8)[None, :], other=0.0)
        if BLOCK_K <= G:  # the tile lies in one group: one scale and minimum per row
            s = tl.load(scales_ptr + n * NG + k0 // G, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
            mn = tl.load(mins_ptr + n * NG + k0 // G, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
        else:  # one per word
            ok = row_ok[:, None] & (i < KW)[None, :]
            g = n[:, None] * NG + (i // (G // 8))[None, :]  # [BLOCK_N, BLOCK_K / 8]
            s = tl.load(scales_ptr + g, mask=ok, other=0.0).to(tl.float32)[:, :, None]
            mn = tl.load(mins_ptr + g, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        w = tl.reshape(tl.fma(_unpack(words, 4), s, mn), [BLOCK_N, BLOCK_K]).to(x.dtype)
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    _store(out_ptr, acc, m, n, M, N, split)


# ---------------------------------------------------------------------------- split-K
@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = sum_s partial[s, j] over the flattened [M, N] outputs."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + s * MN + j, mask=j < MN, other=0.0)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=j < MN)


# ---------------------------------------------------------------------------- launch configs
@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_config(bits: int, M: int, N: int, K: int, sm_count: int) -> dict[str, int]:
    """The launch config for an [M, K] x [N, K]^T product with `bits`-bit weights (8 or 4); the module docstring
    says why. Keys: CONFIG_KEYS."""
    if M == 1:
        block_m, block_k, num_warps, num_stages = 1, 4096 // bits, 4, 3
        block_n = 16 if triton.cdiv(N, 16) >= sm_count else 8
    else:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
        block_n, block_k, num_warps, num_stages = 64, 1024 // bits, 4, 4
    programs = triton.cdiv(N, block_n) * (M if block_m == 1 else triton.cdiv(M, block_m))
    split_k = 1
    while programs * split_k < sm_count and K >= 4 * split_k * block_k:
        split_k *= 2
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                num_stages=num_stages)


def _config(bits: int, M: int, N: int, K: int, device: torch.device, overrides: dict[str, int]) -> dict[str, int]:
    """default_config with the nonzero overrides in place, checked."""
    config = default_config(bits, M, N, K, _sm_count(device)) | {k: v for k, v in overrides.items() if v}
    bm, bk = config["block_m"], config["block_k"]
    assert bm == 1 or bm >= 16, f"block_m={bm}: 1 (gemv) or at least 16 (tl.dot)"
    assert bk & (bk - 1) == 0 and bk >= (16 if bm > 1 else 32 // bits), f"block_k={bk}: a power of two, >= 16"
    return config


def _launch(gemv, dot, x: Tensor, words: Tensor, meta: tuple[Tensor, ...], N: int, config: dict[str, int],
            **constexprs) -> Tensor:
    """Run the gemv or dot kernel on x [M, K] and words [N, KW], then add up the splits; -> y [M, N]."""
    M, K = x.shape
    bm, bn, bk, split_k = config["block_m"], config["block_n"], config["block_k"], config["split_k"]
    k_per_split = bk * triton.cdiv(triton.cdiv(K, bk), split_k)  # a multiple of BLOCK_K
    out = x.new_empty(M, N)
    target = out if split_k == 1 else x.new_empty(split_k, M, N, dtype=torch.float32)
    args = (x, words, *meta, target, M, N, words.shape[1], k_per_split, x.stride(0))
    options = dict(BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=config["num_stages"], num_warps=config["num_warps"],
                   num_stages=config["num_stages"], **constexprs)
    if bm == 1:
        torch.library.wrap_triton(gemv)[(triton.cdiv(N, bn), M, split_k)](*args, **options)
    else:
        torch.library.wrap_triton(dot)[(triton.cdiv(N, bn), triton.cdiv(M, bm), split_k)](*args, BLOCK_M=bm,
                                                                                         **options)
    if split_k > 1:
        block = 1024
        torch.library.wrap_triton(_sum_splits_kernel)[(triton.cdiv(M * N, block),)](
            target, out, M * N, SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------- the ops
@torch.library.triton_op("llama::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, weight: Tensor, scale: Tensor, block_m: int = 0, block_n: int = 0, block_k: int = 0,
                 split_k: int = 0, num_warps: int = 0, num_stages: int = 0) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    config = _config(8, M, N, K, x.device, dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                                                num_warps=num_warps, num_stages=num_stages))
    return _launch(_int8_gemv_kernel, _int8_dot_kernel, x, weight.view(torch.int32), (scale,), N, config)


@torch.library.triton_op("llama::int4_linear", mutates_args=())
def _int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, block_m: int = 0,
                 block_n: int = 0, block_k: int = 0, split_k: int = 0, num_warps: int = 0,
                 num_stages: int = 0) -> Tensor:
    M, K = x.shape
    N = qweight.shape[0]
    config = _config(4, M, N, K, x.device, dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                                                num_warps=num_warps, num_stages=num_stages))
    return _launch(_int4_gemv_kernel, _int4_dot_kernel, x, qweight.view(torch.int32), (scales, mins), N, config,
                   G=group_size)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, *, block_m: int = 0, block_n: int = 0, block_k: int = 0,
                split_k: int = 0, num_warps: int = 0, num_stages: int = 0) -> Tensor:
    """x [M, K] (bf16, fp16 or fp32), weight int8 [N, K], scale [N] in x's dtype -> y [M, N] in x's dtype:

        y[m, n] = scale[n] * sum_k x[m, k] weight[n, k]        (float32 sums)

    K must be a multiple of 4 (the weight is read as int32 words). The keywords override `default_config`
    (0: the default); block_m = 1 is the GEMV kernel, block_m >= 16 the tl.dot one."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert weight.dtype == torch.int8 and weight.is_contiguous() and weight.shape[1] % 4 == 0, "int8 [N, K], K % 4 = 0"
    assert scale.shape == (weight.shape[0],) and scale.is_contiguous(), scale.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    return _int8_linear(x, weight, scale, block_m, block_n, block_k, split_k, num_warps, num_stages)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, *, block_m: int = 0,
                block_n: int = 0, block_k: int = 0, split_k: int = 0, num_warps: int = 0,
                num_stages: int = 0) -> Tensor:
    """x [M, K] (bf16, fp16 or fp32), qweight uint8 [N, K / 2], scales and mins [N, K / G] in x's dtype, G =
    group_size in {32, 64, 128, 256} dividing K -> y [M, N] in x's dtype:

        q[n, 2j] = qweight[n, j] & 15,  q[n, 2j + 1] = qweight[n, j] >> 4
        w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
        y = x @ w.T                                             (float32 sums)

    The keywords override `default_config` (0: the default); block_m = 1 is the GEMV kernel, block_m >= 16 the
    tl.dot one."""
    N, K = qweight.shape[0], x.shape[1]
    assert x.dim() == 2 and group_size in (32, 64, 128, 256) and K % group_size == 0, (x.shape, group_size)
    assert qweight.dtype == torch.uint8 and qweight.shape == (N, K // 2) and qweight.is_contiguous(), qweight.shape
    assert scales.shape == mins.shape == (N, K // group_size) and scales.is_contiguous() and mins.is_contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    return _int4_linear(x, qweight, scales, mins, group_size, block_m, block_n, block_k, split_k, num_warps,
                        num_stages)
