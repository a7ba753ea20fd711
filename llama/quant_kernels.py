"""Triton kernels for weight-only quantized linear layers (llama/quant.py), reading its stored layout directly:

int8_linear   y[m, n] = scale[n] sum_k x[m, k] q[n, k]                    q int8 [N, K], scale [N]
int4_linear   y[m, n] = sum_k x[m, k] (q[n, k] s[n, g] + mn[n, g])        g = k // G, q in 0..15 packed two a byte:
              qweight uint8 [N, K/2], q[n, 2j] = qweight[n, j] & 15, q[n, 2j+1] = qweight[n, j] >> 4; s, mn [N, K/G]

x is [M, K] in bf16, fp16 or fp32, the scales in x's dtype, the output [M, N] in x's dtype; every sum is
accumulated in float32. Both are custom ops (`llama::int8_linear`, `llama::int4_linear`): inside a compiled graph
Inductor launches the kernels as they are, with a launch config fixed when the graph is built.

A decode step reads every weight once, so these kernels are judged by the weight bytes they stream per second.
Two kernels per format:

gemv   BLOCK_M = 1, chosen at M = 1. Program (n block, row m, K split): BLOCK_N weight rows walked along K,
       BLOCK_K features a step, float32 products kept per element and summed once at the end. No tensor cores.
dot    BLOCK_M >= 16, chosen at M >= 2. Program (n block, m block, K split): each step dequantizes a [BLOCK_N,
       BLOCK_K] weight tile and multiplies it by the [BLOCK_M, BLOCK_K] tile of x with tl.dot, as y^T = W x^T
       (the weight tile is the left operand, which Hopper's wgmma takes from registers). Each weight is read
       once per BLOCK_M rows of x.

Unpacking (`_field`). The weights are read as int32 words (the stored bytes viewed), 4 int8 or 8 int4 values
each, and turned into floats without an int-to-float instruction (Triton casts int8 with I2F.S8, one of the
conversions the CUDA guide rates at 16 per SM per clock against 128 fmas: 4e12 a second on an H100, where an int4
GEMV at 3 TB/s needs 6e12): a field is ORed into the low mantissa bits of the float
2^23, whose last place is worth 1, and one fma removes the 2^23 and the field's bit position. Fields are taken in
place from the low half of a word and from the word shifted down 16 bits, so an int4 weight costs one LOP3 and
one fma before its product; int8 bytes get their sign bits flipped first, one XOR per word, to read q + 128.
16-bit x is loaded as int32 pairs, which the loop pipeline copies ahead with cp.async (2-byte loads it would
wait for). Compiled for sm_90 (offline, SASS counted), the loops take ~4.5 (int8 gemv), ~4.8 (int4 gemv), ~5.5
(int8 dot) and ~7.5 (int4 dot) instructions per weight. An H100 issues 33e12 a second (132 SMs x 128 lanes x
1.98 GHz); int4 weights at 80% of 3.35 TB/s are 5.4e12 a second, which leaves 6.2 instructions each (12.4 for
int8): the int4 dot kernel, over that, is expected to top out nearer 65%.

int4 groups. The gemv uses sum_k x_k w_k = s_g sum_k x_k q_k + mn_g sum_k x_k: a step sums x_k q_k over each
group in its tile before the scale and minimum are applied ([BLOCK_N, groups] values, not one per weight). The dot
kernel dequantizes w = q s + mn per weight (float32, then rounded to x's dtype), so BLOCK_K may exceed G.

Split-K. With SPLIT_K > 1 each program covers 1 / SPLIT_K of K and writes float32 partial sums [SPLIT_K, M, N]
that a second small kernel adds up. It pays only when the n blocks alone leave SMs idle: a small N (tensor-
parallel shards), or the dot kernel's 64-row blocks at N = 4096. Elsewhere it would only add a kernel.

Launch configs (`default_config`; no autotuning, since a compiled graph must launch the same kernel every step,
chosen without timing anything; each knob is a keyword override, which scripts/quant_kernels_bench.py sweeps):
  M = 1    gemv: BLOCK_K = 1 KB of each row a step (1024 int8 features; int4: 512 bytes, 1024 features),
           BLOCK_N = 16 (int4 with N >= 8192: 32), 4 warps (each thread holds 4 rows, so each x value it loads
           serves 4 weights), 3 pipeline stages (a loop without tl.dot is pipelined only when tl.range asks).
           BLOCK_N = 8 when N / 16 blocks would leave SMs idle.
  M >= 2   dot: BLOCK_M = 16 / 32 / 64 for M up to 16 / 32 / more, BLOCK_N = 64 (one wgmma tile), BLOCK_K = 128
           features (int8 at BLOCK_M = 16: 256; larger tiles spill registers), and for int4 at most one group, so
           that a tile takes one scale and minimum per row (per word, a [64, 16] gather of them made group 64
           2-3x slower than group 128 on an H100), 4 warps, 4 stages.
  both     SPLIT_K = the smallest power of two that gives every SM a program (the int4 dot kernel: three), as long
           as each split keeps 2 steps.
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
def _field(words, POS: tl.constexpr, BITS: tl.constexpr, magic):
    """The BITS-wide field at bit POS of each int32 word as a float32 integer (POS + BITS <= 16): for int8 the
    words come with every byte's sign bit flipped (`_halves`), so that a byte reads q + 128 in 0..255 (two's
    complement), and q = -128..127 comes out; int4 fields are q = 0..15. magic = 0x4B000000, the bits of 2^23.

    The float with bits magic | v is 2^23 + v (its last mantissa bit is worth 1), so with the field left in place,
    f = 2^23 + v 2^POS, and v = f 2^-POS - 2^(23 - POS), exact in one fma. magic is a run-time argument, not a
    constant: ptxas then keeps it in a register instead of re-creating the mask before every LOP3 (which takes
    one immediate), 0.5 of ~4.5 instructions per weight."""
    f = ((words & (((1 << BITS) - 1) << POS)) | magic).to(tl.float32, bitcast=True)
    offset: tl.constexpr = 128.0 if BITS == 8 else 0.0
    return tl.fma(f, 1.0 / (1 << POS), -(8388608.0 / (1 << POS) + offset))


@triton.jit
def _halves(words, BITS: tl.constexpr):
    """(low, high): the words ready for `_value`, the high 16 bits moved down in `high`; for int8, every byte's
    sign bit flipped first (one instruction per 4 weights)."""
    if BITS == 8:
        words = words ^ -0x7F7F7F80  # 0x80808080 as an int32
    return words, words >> 16


@triton.jit
def _value(low, high, t: tl.constexpr, BITS: tl.constexpr, magic):
    """Value t of the 32 / BITS packed in each int32 word (lowest bits first) as float32, from `_halves`."""
    LANES: tl.constexpr = 32 // BITS
    return _field(low if t < LANES // 2 else high, BITS * (t % (LANES // 2)), BITS, magic)


@triton.jit
def _x_value(x_ptr, i, in_k, t: tl.constexpr, LANES: tl.constexpr):
    """x[LANES * i + t] of one row of x (x_ptr: that row) as float32 [len(i)].

    16-bit x is read as int32 pairs: 4-byte loads, which the loop pipeline copies ahead (cp.async takes 4 bytes
    or more), where 2-byte loads would be waited for in each step. Values t and t + 1 load the same pair (once)."""
    if x_ptr.dtype.element_ty == tl.float32:
        return tl.load(x_ptr + LANES * i + t, mask=in_k, other=0.0)
    pair = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + LANES // 2 * i + t // 2, mask=in_k, other=0)
    bits = (pair >> (16 * (t % 2))) & 0xFFFF
    if x_ptr.dtype.element_ty == tl.bfloat16:  # a bfloat16 is the top half of a float32
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


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
def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x, magic,
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
        low, high = _halves(words, 8)
        for t in tl.static_range(4):
            acc = tl.fma(_value(low, high, t, 8, magic), _x_value(x_row, i, in_k, t, 4)[None, :], acc)
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    _store(out_ptr, tl.sum(acc, axis=1) * scale, m, n, M, N, split)


@triton.jit
def _int8_dot_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x, magic,
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
        low, high = _halves(words, 8)
        q0, q1 = _value(low, high, 0, 8, magic).to(x.dtype), _value(low, high, 1, 8, magic).to(x.dtype)
        q2, q3 = _value(low, high, 2, 8, magic).to(x.dtype), _value(low, high, 3, 8, magic).to(x.dtype)
        # tl.join adds a last dim of 2 within each thread: w[n, i, a, c] = value 2a + c of word i, which the
        # reshape puts at k = 4i + 2a + c. int8 values are exact in bf16 and fp16.
        w = tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), [BLOCK_N, BLOCK_K])
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")  # "ieee": fp32 x without tf32 rounding
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    _store(out_ptr, acc * scale[:, None], m, n, M, N, split)


# ---------------------------------------------------------------------------- int4
@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x, magic,
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
        low, high = _halves(words, 4)
        dots = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)  # [n, i]: sum_t x[8i + t] q[n, 8i + t]
        x_sum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for t in tl.static_range(8):
            x_t = _x_value(x_row, i, in_k, t, 8)
            dots = tl.fma(_value(low, high, t, 4, magic), x_t[None, :], dots)
            x_sum += x_t
        dots = tl.sum(tl.reshape(dots, [BLOCK_N, GROUPS, WORDS]), axis=2)  # [BLOCK_N, GROUPS]
        x_sum = tl.sum(tl.reshape(x_sum, [GROUPS, WORDS]), axis=1)  # [GROUPS]
        total += s * dots + mn * x_sum[None, :]
    _store(out_ptr, tl.sum(total, axis=1), m, n, M, N, split)


@triton.jit
def _dequantized(low, high, t: tl.constexpr, s, mn, magic, dtype: tl.constexpr):
    """w = q s + mn for value t of each word, in dtype."""
    return tl.fma(_value(low, high, t, 4, magic), s, mn).to(dtype)


@triton.jit
def _int4_dot_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x, magic,
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
            s = tl.load(scales_ptr + n * NG + k0 // G, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            mn = tl.load(mins_ptr + n * NG + k0 // G, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        else:  # one per word
            ok = row_ok[:, None] & (i < KW)[None, :]
            g = n[:, None] * NG + (i // (G // 8))[None, :]  # [BLOCK_N, BLOCK_K / 8]
            s = tl.load(scales_ptr + g, mask=ok, other=0.0).to(tl.float32)
            mn = tl.load(mins_ptr + g, mask=ok, other=0.0).to(tl.float32)
        low, high = _halves(words, 4)
        w0, w1 = _dequantized(low, high, 0, s, mn, magic, x.dtype), _dequantized(low, high, 1, s, mn, magic, x.dtype)
        w2, w3 = _dequantized(low, high, 2, s, mn, magic, x.dtype), _dequantized(low, high, 3, s, mn, magic, x.dtype)
        w4, w5 = _dequantized(low, high, 4, s, mn, magic, x.dtype), _dequantized(low, high, 5, s, mn, magic, x.dtype)
        w6, w7 = _dequantized(low, high, 6, s, mn, magic, x.dtype), _dequantized(low, high, 7, s, mn, magic, x.dtype)
        # w[n, i, a, b, c] = w of value 4a + 2b + c of word i, which the reshape puts at k = 8i + 4a + 2b + c
        w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        acc = tl.dot(tl.reshape(w, [BLOCK_N, BLOCK_K]), tl.trans(x), acc, input_precision="ieee")
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


def default_config(bits: int, M: int, N: int, K: int, sm_count: int, group_size: int = 0,
                   **overrides: int) -> dict[str, int]:
    """The launch config (keys CONFIG_KEYS) of an [M, K] x [N, K]^T product with `bits`-bit weights (8 or 4) on a
    GPU with `sm_count` SMs; the module docstring says why. Nonzero `overrides` replace single choices, and
    split_k, unless given, follows the tiles chosen."""
    overrides = {key: value for key, value in overrides.items() if value}
    assert set(overrides) <= set(CONFIG_KEYS), overrides
    if overrides.get("block_m", 1 if M == 1 else 16) == 1:
        config = dict(block_m=1, block_n=16 if triton.cdiv(N, 16) >= sm_count else 8, block_k=8192 // bits,
                      num_warps=4, num_stages=3)
        if bits == 4:  # the H100 sweep: half a KB of each row a step, 32 rows from 8k rows on (-1% to -14%)
            config |= dict(block_k=1024, block_n=32 if N >= 8192 else config["block_n"])
    else:
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
        config = dict(block_m=block_m, block_n=64, block_k=256 if block_m == 16 and bits == 8 else 128,
                      num_warps=4, num_stages=4)
        if bits == 4 and group_size:  # a tile within one group: one scale and minimum per row, not per word
            config["block_k"] = min(config["block_k"], group_size)
    config |= overrides
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    assert bm == 1 or bm >= 16, f"block_m={bm}: 1 (gemv) or at least 16 (tl.dot)"
    assert bk & (bk - 1) == 0 and bk >= (16 if bm > 1 else 32 // bits), f"block_k={bk}: a power of two, >= 16"
    if "split_k" not in config:
        programs, split_k = triton.cdiv(N, bn) * (M if bm == 1 else triton.cdiv(M, bm)), 1
        # (the int4 dot kernel wants ~3 programs per SM: 2-3x faster at 16 rows on an H100, docs/benchmarks.md)
        wanted = 3 * sm_count if bits == 4 and bm > 1 else sm_count
        while programs * split_k < wanted and K >= 4 * split_k * bk:
            split_k *= 2
        config["split_k"] = split_k
    return {key: config[key] for key in CONFIG_KEYS}


def _launch(gemv, dot, x: Tensor, words: Tensor, meta: tuple[Tensor, ...], N: int, config: dict[str, int],
            **constexprs) -> Tensor:
    """Run the gemv or dot kernel on x [M, K] and words [N, KW], then add up the splits; -> y [M, N]."""
    M, K = x.shape
    if x.stride(1) != 1 or x.stride(0) % 2 or x.storage_offset() % 2:  # the gemv reads 16-bit x as int32 pairs
        x = x.clone(memory_format=torch.contiguous_format)
    bm, bn, bk, split_k = config["block_m"], config["block_n"], config["block_k"], config["split_k"]
    k_per_split = bk * triton.cdiv(triton.cdiv(K, bk), split_k)  # a multiple of BLOCK_K
    out = x.new_empty(M, N)
    target = out if split_k == 1 else x.new_empty(split_k, M, N, dtype=torch.float32)
    args = (x, words, *meta, target, M, N, words.shape[1], k_per_split, x.stride(0), 0x4B000000)
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
    config = default_config(8, M, N, K, _sm_count(x.device), block_m=block_m, block_n=block_n, block_k=block_k,
                            split_k=split_k, num_warps=num_warps, num_stages=num_stages)
    return _launch(_int8_gemv_kernel, _int8_dot_kernel, x, weight.view(torch.int32), (scale,), N, config)


@torch.library.triton_op("llama::int4_linear", mutates_args=())
def _int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, block_m: int = 0,
                 block_n: int = 0, block_k: int = 0, split_k: int = 0, num_warps: int = 0,
                 num_stages: int = 0) -> Tensor:
    M, K = x.shape
    N = qweight.shape[0]
    config = default_config(4, M, N, K, _sm_count(x.device), group_size, block_m=block_m, block_n=block_n,
                            block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=num_stages)
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
    return _int4_linear(x, qweight, scales, mins, group_size, block_m, block_n, block_k, split_k, num_warps,
                        num_stages)
