"""Triton kernels for weight-only quantized linear layers (llama/quant.py), reading its stored layout directly:

int8_linear   y[m, n] = scale[n] sum_k x[m, k] q[n, k]                    q int8 [N, K], scale [N]
int4_linear   y[m, n] = sum_k x[m, k] (q[n, k] s[n, g] + mn[n, g])        g = k // G, q in 0..15 packed two a byte:
              qweight uint8 [N, K/2], q[n, 2j] = qweight[n, j] & 15, q[n, 2j+1] = qweight[n, j] >> 4; s, mn [N, K/G]

x is [M, K] in bf16, fp16 or fp32, the scales in x's dtype, the output [M, N] in x's dtype; every sum is
accumulated in float32 (the gemvs: in int32 over a step, then in float32). Both are custom ops
(`llama::int8_linear`, `llama::int4_linear`) that launch their kernels themselves, with programmatic dependent
launch on Hopper and later GPUs (`llama.kernels.launch`: each kernel starts during the last wave of the one before
it and waits inside for its inputs); inside a compiled graph Inductor calls them as they are, and the CUDA graph
records their launches, with a launch config fixed when the graph is built.

A decode step reads every weight once, so these kernels are judged by the weight bytes they stream per second.
Two kernels per format:

gemv   BLOCK_M = 1, chosen at M = 1. Program (n block, row m, K split): BLOCK_N weight rows walked along K,
       BLOCK_K features a step, integer products (below), no tensor cores.
dot    BLOCK_M >= 16, chosen at M >= 2. Program (n block, m block, K split): each step turns a [BLOCK_N, BLOCK_K]
       weight tile into x's dtype and multiplies it by the [BLOCK_M, BLOCK_K] tile of x with tl.dot, as
       y^T = W x^T (the weight tile is the left operand, which the tensor cores take from registers). Each weight
       is read once per BLOCK_M rows of x.

The gemvs multiply in integers (`_x16_step`, `_dot2`). The weights are read as int32 words (the stored bytes
viewed), 4 int8 or 8 int4 values each. A step rounds its BLOCK_K values of x to 16-bit integers against the largest
|x| of the step (int8) or of each group (int4), x ~ d v with d = max |x| / 32767 (at most 2^-16 of that largest
value off; bf16 x itself carries 2^-9 of each value), packs them two a word, and one dp2a instruction multiplies a
word's two 16-bit values by two of a weight word's bytes and adds both products to an int32 sum, exactly: int8 bytes
are used as they are (2 dp2a a word), int4 words are split into their low and high nibbles by two masks (features 0,
2, 4, 6 and 1, 3, 5, 7 of the word, each nibble alone in a byte; 4 dp2a a word). The step's int32 sums then take d
(and for int4, per group, the scale; the minimum multiplies the float sum of x). Compiled for sm_90 by Triton 3.6
(offline, SASS counted), the loops take ~1.9 (int8) and ~2.4 (int4) instructions per weight, against ~4.3 and ~4.6
for the float32 loops they replaced (a field ORed into the mantissa of 2^23, one fma to take it out, one fma for its
product: `_byte`, which the int8 dot kernel still uses). On an H100 that made the int4 gemvs 2-14% faster (10% over
a layer's four) and the int8 ones 1-4% (docs/benchmarks.md): issue was not what bound the float loops; each kernel's
fixed start and end weigh more (qkv's 14 MB at 8B, 4.7 µs at the copy rate, take 9.2 µs). 16-bit x is loaded as
int32 pairs, which the loop pipeline copies ahead with cp.async (2-byte loads it would wait for).

Unpacking for the int8 dot kernel (`_byte`): Triton casts int8 with I2F.S8, one of the conversions the CUDA
guide rates at 16 per SM per clock against 128 fmas; instead a field is ORed into the low mantissa bits of the
float 2^23, whose last place is worth 1, and one fma removes the 2^23 and the field's bit position, after one XOR
per word that flips every byte's sign bit to read q + 128 (~5.5 instructions per weight in the whole loop).

The int4 dot kernel (`_int4_dot_kernel`) reads qweight as 16-bit units, 4 consecutive features each (nibble t of
unit i is feature 4i + t), so one [BLOCK_N, BLOCK_K / 4] tile of units gives four weight tiles w_t[n, i] =
w[n, 4i + t], multiplied by the four tiles x_t[m, i] = x[m, 4i + t] that a reshape and two tl.split take out of
the x tile in registers: the stored layout needs no change. Inline PTX (`_units_to_weights`) converts two units
(one 32-bit register) at a time: a nibble of each half ORed into bf16 128.0 (fp16 1024.0), whose last place is
worth 1, a packed subtract of 128 leaves q exactly, and a packed fma makes w = q s + mn, rounded once to x's
dtype as F.linear on the dequantized weight would see it: 15 instructions for 8 weights, ~2.8-3.2 per weight in
the whole loop (Triton 3.6, sm_90; the previous kernel, float32 dequantization then joins and a reshape, took
~8.4). float32 x, and Triton's interpreter (which cannot run PTX), compute w in float32 instead.
Triton picks the tensor-core instruction from the warp count: with 1-2 warps mma.sync (HMMA), whose operands are
plain registers; with 4 or 8, wgmma, after each of which Triton 3.6 waits when the left operand comes from
registers, and whose x tiles go through shared memory with a fence: on an H100 the wgmma version ran at 19-28%
of the copy bandwidth at 1 and 16 rows, latency-bound, where 2 warps of mma.sync reached 32-51% at 16 rows (docs/
benchmarks.md). A step covers two groups (BLOCK_K = 2 G, G = 64 or 128) whose scales and minimums are one 4-byte
pair per row, which the pipeline copies ahead; group 32 takes one per unit, group 256 one group a step.

Rows past N and M are clamped to the last row (read again, not stored), so no tile load needs a mask but the one
along K when BLOCK_K does not divide K.

int4 groups in the gemv: sum_k x_k w_k = s_g sum_k x_k q_k + mn_g sum_k x_k; a step sums x_k q_k over each group
in its tile before the scale and minimum are applied ([BLOCK_N, groups] values, not one per weight).

A batch-1 decode step's neighbours of the products, inside the gemvs (`_finish`, `quant.fuse_gpu_decode`): the
RMSNorm before qkv and gate_up (x times the norm's weight as it is read, sum x^2 on the way, the outputs times
1 / rms at the end), SwiGLU after gate_up (a program takes BLOCK_N / 2 rows of the gate and the same rows of the
up projection, `_gemv_rows`, and stores silu(gate) * up), the residual add after o and down (before the one
rounding). Each program of the blocked gemvs walks all of x, so the norm's work on x is repeated in every program:
on an H100 it costs gate_up 3.2 µs of its 29.5 at 8B int4, where the norm's own kernel and the gap before it took
2.4-4.7 µs (docs/benchmarks.md); the persistent int4 gemv rounds x, the norm's weight in, once a program.

Split-K. With SPLIT_K > 1 each program covers 1 / SPLIT_K of K and writes float32 partial sums [SPLIT_K, M, N]
that a second small kernel adds up. It pays only when the n blocks alone leave SMs idle: a small N (tensor-
parallel shards, qkv, o and down at 8B), or row blocks of 64. Elsewhere it would only add a kernel.

Launch configs (`default_config`; no autotuning, since a compiled graph must launch the same kernel every step,
chosen without timing anything; each knob is a keyword override, which scripts/quant_kernels_bench.py sweeps):
  M = 1    int4, groups of 32 and 64 with K <= 16384 and of 128 with K <= 4096: the persistent gemv
           (`_int4_gemv_resident_kernel`), `programs` a SM (3 up to K = 4096, else 2), BLOCK_N = 4 rows a step
           (2 past K = 4096), 4 warps, 3 stages: the best of an H100 chain of 8B layers (g64: 69.1 -> 64.4 us a
           layer; g32 72.5-73.2 -> 67.3; g128 69.2 -> 66.2, and 67.3 with down too). Alone, against the blocked
           gemv's best config, g64 was 1-12% faster on the 8B and 70B shapes but o at 70B (+2%) and down at 8B
           (+4%, where the chain gained 0.9 us); g128 past K = 4096 3-21% slower. Groups of 256 were not
           measured and keep the blocked gemv, as does any K past 16384 (x would not fit in registers). A programs
           override asks for it, a block_k or split_k override for the blocked gemv:
  M = 1    gemv: BLOCK_K = 1 KB of each row a step (1024 int8 features, 2048 int4 ones; int4 with N >= 8192:
           512 bytes: on the H100 sweep 1 KB was 3-12% faster at o and down, half a KB 2% at gate_up; with the
           norm inside, half a KB everywhere: 6-13% faster at qkv, 0-3% at gate_up),
           BLOCK_N = 16, 4 warps (each thread holds several rows, so each x value it loads and rounds serves
           several weights), 3 pipeline stages (a loop without tl.dot is pipelined only when tl.range asks).
           BLOCK_N = 8 when N / 16 blocks would leave SMs idle. (The int4 dot kernel at one row, 16 rows of x
           of which one is used, was not faster than this gemv on an H100.)
  M >= 2   int8 dot: BLOCK_M = 16 / 32 / 64 for M up to 16 / 32 / 64, BLOCK_N = 64 (one wgmma tile), BLOCK_K =
           128 features (256 at BLOCK_M = 16; larger tiles spill registers), 4 warps, 4 stages; past 64 rows (a
           prefill), BLOCK_M = 128 and 64 features a step (the H100 sweep at 128 rows, 8B shapes: a layer's four
           products 250 -> 209 us, where bf16 F.linear takes 185). The sweep's best, 128 x 128 tiles of 64
           features with 8 warps (181 us), was right alone but wrong inside the model (relative error 1e2 or
           NaN, changing from run to run, with PDL or without; 128 features a step with 8 warps were right):
           left out, not understood.
           int4 dot: BLOCK_N = 64, 2 warps (mma.sync), 3 stages, at every BLOCK_M for groups of 32 and 64 (the
           H100 sweeps' best at 16 and 64 rows, 15-22% under 8-warp wgmma at 64; 32 rows not measured); for
           groups of 128 at BLOCK_M = 16 and 16-bit x, BLOCK_N = 32 and one warp (the 8B sweep's best, 5-16%
           under two; float32 x, not swept, keeps two);
           for groups of 128 and 256 from BLOCK_M = 32 on, BLOCK_N = 128 and wgmma with 4 warps (the sweep's
           best at 64 rows), and past 64 rows BLOCK_M = 128 (at 128 rows, group 128: a layer 287 -> 245 us;
           groups of 32 and 64 keep BLOCK_M = 64); BLOCK_K = 2 G (64 at G = 32, 256 at G = 256), at most 128
           for float32 x, which also takes 2 stages (shared memory).
  both     SPLIT_K = the smallest power of two that gives every SM a program (int4 at BLOCK_M = 16: two), as long
           as each split keeps 2 steps.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from llama.kernels import launch, let_next_start, wait_for_inputs
from llama.model import rms_norm, silu_mul

CONFIG_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "programs")
MAGIC = 0x4B000000  # the bits of the float32 2^23 (`_byte`)


# ---------------------------------------------------------------------------- unpacking
@triton.jit
def _byte(words, POS: tl.constexpr, magic):
    """The byte at bit POS (0 or 8) of each int32 word as a float32 integer: the words come with every byte's sign
    bit flipped (`_halves`), so that a byte reads q + 128 in 0..255, and q = -128..127 comes out. magic =
    0x4B000000, the bits of 2^23.

    The float with bits magic | v is 2^23 + v (its last mantissa bit is worth 1), so with the byte left in place,
    f = 2^23 + v 2^POS, and v = f 2^-POS - 2^(23 - POS), exact in one fma. magic is a run-time argument, not a
    constant: ptxas then keeps it in a register instead of re-creating the mask before every LOP3 (which takes
    one immediate)."""
    f = ((words & (0xFF << POS)) | magic).to(tl.float32, bitcast=True)
    return tl.fma(f, 1.0 / (1 << POS), -(8388608.0 / (1 << POS) + 128.0))


@triton.jit
def _halves(words):
    """(low, high): int8 words ready for `_value`, every byte's sign bit flipped (one instruction per 4 weights),
    the high 16 bits moved down in `high`."""
    words = words ^ -0x7F7F7F80  # 0x80808080 as an int32
    return words, words >> 16


@triton.jit
def _value(low, high, t: tl.constexpr, magic):
    """Byte t of each int32 word (lowest first) as float32, from `_halves`."""
    return _byte(low if t < 2 else high, 8 * (t % 2), magic)


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
def _store(out_ptr, y, m, n, M, N, split, res_ptr, RESIDUAL: tl.constexpr):
    """y [BLOCK_N] or [BLOCK_N, BLOCK_M] -> out[split, m, n]: the output itself, or one split's float32 partials;
    RESIDUAL (the output itself): plus residual[m, n], before the one rounding to the output's dtype."""
    if len(y.shape) == 1:
        if RESIDUAL:
            y += tl.load(res_ptr + m * N + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + (split * M + m) * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)
    else:
        inside = (n[:, None] < N) & (m[None, :] < M)
        if RESIDUAL:
            y += tl.load(res_ptr + m[None, :] * N + n[:, None], mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + (split * M + m[None, :]) * N + n[:, None], y.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------- integer products (the gemvs)
X16_ROUND = tl.constexpr(12582912.0)  # 1.5 2^23: v + X16_ROUND, a float, holds round(v) in its low 16 bits


@triton.jit
def _x_lane(x_row, g_row, i, in_k, t: tl.constexpr, LANES: tl.constexpr, NORM: tl.constexpr):
    """(x_t, x_t^2) for x_t = x[LANES i + t] as float32, x_t times the norm's weight g[LANES i + t] when NORM (the
    square is of x alone: the norm's statistic)."""
    x = _x_value(x_row, i, in_k, t, LANES)
    if NORM:
        return x * _x_value(g_row, i, in_k, t, LANES), x * x
    else:
        return x, x * x


@triton.jit
def _x16_step(x_row, g_row, i, in_k, LANES: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr = 0):
    """The step's x, 8 (int4) or 4 (int8) features a word: x_t[i] = x[LANES i + t] (times the norm's weight g when
    NORM) rounded to 16-bit integers against the largest |x| of the step, or with CHUNK of each CHUNK consecutive
    words (an int4 group), x_t ~ d v_t with d = max |x| / 32767 and |v_t| <= 32767 (1.5e-5 of that largest value
    at most: bf16 x itself carries 2^-9 of each value), packed two a word in the order the weights' bytes take
    them (`_dot2`): -> (the pairs of a word, 4 or 2 of them, d (a scalar, or [len(i) / CHUNK]), the float sum of x
    over each word's features, the sum of their squares before g). A chunk's words lie in adjacent lanes of one
    warp, so its d needs no exchange between warps, where the step's needs two barriers.

    The rounding is one fma: v + 1.5 2^23 is a float whose last place is worth 1, and whose low 16 bits are round(v)
    in two's complement (the high bits, 0x4B40, are dropped by the packing)."""
    x0, q0 = _x_lane(x_row, g_row, i, in_k, 0, LANES, NORM)
    x1, q1 = _x_lane(x_row, g_row, i, in_k, 1, LANES, NORM)
    x2, q2 = _x_lane(x_row, g_row, i, in_k, 2, LANES, NORM)
    x3, q3 = _x_lane(x_row, g_row, i, in_k, 3, LANES, NORM)
    biggest = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
    x_sum = (x0 + x1) + (x2 + x3)
    squares = (q0 + q1) + (q2 + q3)
    if LANES == 8:
        x4, q4 = _x_lane(x_row, g_row, i, in_k, 4, LANES, NORM)
        x5, q5 = _x_lane(x_row, g_row, i, in_k, 5, LANES, NORM)
        x6, q6 = _x_lane(x_row, g_row, i, in_k, 6, LANES, NORM)
        x7, q7 = _x_lane(x_row, g_row, i, in_k, 7, LANES, NORM)
        biggest = tl.maximum(biggest, tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)),
                                                 tl.maximum(tl.abs(x6), tl.abs(x7))))
        x_sum += (x4 + x5) + (x6 + x7)
        squares += (q4 + q5) + (q6 + q7)
    if CHUNK:  # a d per CHUNK words: [len(i) / CHUNK]
        amax = tl.maximum(tl.max(tl.reshape(biggest, [biggest.shape[0] // CHUNK, CHUNK]), axis=1), 1e-30)
        inv = tl.reshape(tl.broadcast_to((32767.0 / amax)[:, None], [biggest.shape[0] // CHUNK, CHUNK]),
                         [biggest.shape[0]])
    else:
        amax = tl.maximum(tl.max(biggest, axis=0), 1e-30)
        inv = 32767.0 / amax
    if LANES == 8:  # int4: the low nibbles of a word are features 0, 2, 4, 6, the high ones 1, 3, 5, 7
        return (_pair(x0, x2, inv), _pair(x4, x6, inv), _pair(x1, x3, inv), _pair(x5, x7, inv), amax / 32767.0,
                x_sum, squares)
    else:  # int8: bytes 0..3 are features 0..3
        return _pair(x0, x1, inv), _pair(x2, x3, inv), amax / 32767.0, x_sum, squares


@triton.jit
def _gemv_rows(pid_n, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """(the weight rows n of a gemv's n block [BLOCK_N], which of them exist): BLOCK_N consecutive rows, or with
    SWIGLU (N = 2F rows, the gate's, then the up projection's) BLOCK_N / 2 rows of the gate and the same rows of
    the up projection, so that `_finish` holds both halves of each of its outputs."""
    j = tl.arange(0, BLOCK_N)
    if SWIGLU:
        gate = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        return tl.where(j < BLOCK_N // 2, gate, gate + N // 2), gate < N // 2
    else:
        n = pid_n * BLOCK_N + j
        return n, n < N


@triton.jit
def _finish(out_ptr, y, m, n, M, N, split, pid_n, squares, K, ss_ptr, res_ptr, eps, NORM: tl.constexpr,
            RESIDUAL: tl.constexpr, SPLIT: tl.constexpr, SWIGLU: tl.constexpr):
    """Store a gemv's y [BLOCK_N] for row m. Whole (not SPLIT): y / rms(x) with rms(x) = sqrt(sum x^2 / K + eps)
    when NORM (the RMSNorm that came before the product: its weight already multiplied x, its statistic is
    `squares` summed over K), then with SWIGLU silu(gate) * up of the block's row pairs (`_gemv_rows`: out[m, :F],
    F = N / 2), or plus the residual [M, N] when RESIDUAL. A split stores its partial sums and (the first n block)
    its part of sum x^2 for `_sum_splits_kernel`, which finishes."""
    if SPLIT:
        if NORM:
            if pid_n == 0:
                tl.store(ss_ptr + split * M + m, tl.sum(squares, axis=0))
    elif NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if SWIGLU:
        HALF: tl.constexpr = y.shape[0] // 2
        gate, up = tl.split(tl.permute(tl.reshape(y, [2, HALF]), (1, 0)))
        y = gate * tl.sigmoid(gate) * up
        n, N = pid_n * HALF + tl.arange(0, HALF), N // 2
    _store(out_ptr, y, m, n, M, N, split, res_ptr, RESIDUAL and not SPLIT)


@triton.jit
def _pair(a, b, inv):
    """round(a inv) in the low 16 bits of a word and round(b inv) in the high 16 bits."""
    ra = tl.fma(a, inv, X16_ROUND).to(tl.int32, bitcast=True)
    rb = tl.fma(b, inv, X16_ROUND).to(tl.int32, bitcast=True)
    return (ra & 0xFFFF) | (rb << 16)


@triton.jit
def _dot2(pairs, words, acc, HIGH: tl.constexpr, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """acc + p0 b[2h] + p1 b[2h + 1], h = HIGH: p0, p1 the signed 16-bit halves of `pairs` (low first), b[j] byte j of
    `words` (signed for int8, unsigned for int4 nibbles), exact in int32. On a GPU one dp2a instruction (two
    products and the sum); elsewhere (Triton's interpreter) the same sum spelled out."""
    if ASM:
        asm: tl.constexpr = ("dp2a." + ("hi" if HIGH else "lo") + ".s32." + ("s32" if SIGNED else "u32")
                             + " $0, $1, $2, $3;")
        return tl.inline_asm_elementwise(asm, "=r,r,r,r", [pairs, words, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        SHIFT: tl.constexpr = 16 if HIGH else 0
        if SIGNED:
            b0 = (words << (24 - SHIFT)) >> 24
            b1 = (words << (16 - SHIFT)) >> 24
        else:
            b0 = (words >> SHIFT) & 0xFF
            b1 = (words >> (SHIFT + 8)) & 0xFF
        return acc + ((pairs << 16) >> 16) * b0 + (pairs >> 16) * b1


# ---------------------------------------------------------------------------- int8
@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x, g_ptr, res_ptr, ss_ptr,
                      eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                      NORM: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT: tl.constexpr, SWIGLU: tl.constexpr,
                      ASM: tl.constexpr, PDL: tl.constexpr):
    """Program (n block, row m, split): y[m, n] = scale[n] sum_k x[m, k] q[n, k] for BLOCK_N rows n over the split's
    K range. Word i of a row holds q[n, 4i + t] in byte t; a step multiplies them by x rounded to 16 bits
    (`_x16_step`), two products an instruction summed exactly in int32 (`_dot2`), and acc[n, i] adds d times
    that sum. NORM, RESIDUAL, SWIGLU: x is normalised, the residual added, SwiGLU applied on the way (`_finish`)."""
    pid_n, m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, row_ok = _gemv_rows(pid_n, N, BLOCK_N, SWIGLU)  # [BLOCK_N]
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW  # [BLOCK_N, 1]
    x_row = x_ptr + m * stride_x
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K // 4], dtype=tl.float32)
    start = split * k_per_split
    wait_for_inputs(PDL)
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 4), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # [BLOCK_K / 4] word index
        in_k = i < KW
        words = tl.load(w_rows + i[None, :], mask=row_ok[:, None] & in_k[None, :], other=0)
        p01, p23, d, _, step_squares = _x16_step(x_row, g_ptr, i, in_k, 4, NORM)
        dot = _dot2(p01[None, :], words, 0, False, True, ASM)  # bytes 0, 1
        dot = _dot2(p23[None, :], words, dot, True, True, ASM)  # bytes 2, 3
        acc = tl.fma(dot.to(tl.float32), d, acc)
        squares += step_squares
    let_next_start(PDL)
    scale = tl.load(scale_ptr + n, mask=row_ok, other=0.0).to(tl.float32)
    _finish(out_ptr, tl.sum(acc, axis=1) * scale, m, n, M, N, split, pid_n, squares, KW * 4, ss_ptr, res_ptr, eps,
            NORM, RESIDUAL, SPLIT, SWIGLU)


@triton.jit
def _int8_dot_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, KW, k_per_split, stride_x, res_ptr, magic,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                     RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """Program (n block, m block, split): acc[n, m] = sum_k q[n, k] x[m, k] with tl.dot on dequantized tiles,
    y[m, n] = scale[n] acc[n, m] (+ residual[m, n], RESIDUAL)."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW
    x_rows = x_ptr + m[:, None] * stride_x
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    start = split * k_per_split
    wait_for_inputs(PDL)
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 4), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # [BLOCK_K / 4]
        words = tl.load(w_rows + i[None, :], mask=(n[:, None] < N) & (i < KW)[None, :], other=0)
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x = tl.load(x_rows + k[None, :], mask=(m[:, None] < M) & (k < KW * 4)[None, :], other=0.0)
        low, high = _halves(words)
        q0, q1 = _value(low, high, 0, magic).to(x.dtype), _value(low, high, 1, magic).to(x.dtype)
        q2, q3 = _value(low, high, 2, magic).to(x.dtype), _value(low, high, 3, magic).to(x.dtype)
        # tl.join adds a last dim of 2 within each thread: w[n, i, a, c] = value 2a + c of word i, which the
        # reshape puts at k = 4i + 2a + c. int8 values are exact in bf16 and fp16.
        w = tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), [BLOCK_N, BLOCK_K])
        acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")  # "ieee": fp32 x without tf32 rounding
    let_next_start(PDL)
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    _store(out_ptr, acc * scale[:, None], m, n, M, N, split, res_ptr, RESIDUAL)


# ---------------------------------------------------------------------------- int4
@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x, g_ptr,
                      res_ptr, ss_ptr, eps, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NUM_STAGES: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
                      SWIGLU: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Program (n block, row m, split): y[m, n] over the split's K range for BLOCK_N rows n. Word i of a row holds
    q[n, 8i + t] in bits 4t..4t+3. A step covers GROUPS whole groups of G / 8 words, or part of one group
    (WORDS words); per group, y += s sum_k x_k q_k + mn sum_k x_k, the first sum over x rounded to 16 bits
    (`_x16_step`, rounded against the group's largest |x|) in int32, two products an instruction (`_dot2`), times
    the group's d. NORM, RESIDUAL, SWIGLU: as in int8."""
    WORDS: tl.constexpr = min(BLOCK_K, G) // 8  # words of one group in a step
    GROUPS: tl.constexpr = BLOCK_K // (8 * WORDS)
    pid_n, m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, row_ok = _gemv_rows(pid_n, N, BLOCK_N, SWIGLU)  # [BLOCK_N]
    NG = KW * 8 // G
    w_rows = w_ptr + n[:, None].to(tl.int64) * KW  # [BLOCK_N, 1]
    x_row = x_ptr + m * stride_x
    total = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
    start = split * k_per_split
    wait_for_inputs(PDL)
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KW * 8), BLOCK_K, num_stages=NUM_STAGES):
        i = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BLOCK_K / 8] word index
        in_k = i < KW
        words = tl.load(w_rows + i[None, :], mask=row_ok[:, None] & in_k[None, :], other=0)
        g = k0 // G + tl.arange(0, GROUPS)  # [GROUPS] group index
        ok = row_ok[:, None] & (g < NG)[None, :]
        s = tl.load(scales_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)  # [BLOCK_N, GROUPS]
        mn = tl.load(mins_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)
        p0, p1, p2, p3, d, x_sum, step_squares = _x16_step(x_row, g_ptr, i, in_k, 8, NORM, WORDS)  # d: [GROUPS]
        low, high = words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F  # features 8i + 0, 2, 4, 6 and 8i + 1, 3, 5, 7
        dot = _dot2(p0[None, :], low, 0, False, False, ASM)
        dot = _dot2(p1[None, :], low, dot, True, False, ASM)
        dot = _dot2(p2[None, :], high, dot, False, False, ASM)
        dot = _dot2(p3[None, :], high, dot, True, False, ASM)  # [n, i]: sum_t v_t q[n, 8i + t]
        dot = tl.sum(tl.reshape(dot, [BLOCK_N, GROUPS, WORDS]), axis=2)  # [BLOCK_N, GROUPS]
        x_sum = tl.sum(tl.reshape(x_sum, [GROUPS, WORDS]), axis=1)  # [GROUPS]
        total += s * (dot.to(tl.float32) * d[None, :]) + mn * x_sum[None, :]
        squares += step_squares
    let_next_start(PDL)
    _finish(out_ptr, tl.sum(total, axis=1), m, n, M, N, split, pid_n, squares, KW * 8, ss_ptr, res_ptr, eps, NORM,
            RESIDUAL, SPLIT, SWIGLU)


@triton.jit
def _int4_gemv_resident_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KW, k_per_split, stride_x, g_ptr,
                               res_ptr, ss_ptr, eps, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               NUM_STAGES: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                               SPLIT: tl.constexpr, SWIGLU: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Program (p, row m) of a persistent grid (`programs` a config): x over all of K is rounded once, before the
    loop, and stays in registers (1 / rms(x) folded into its d and sums when NORM); the program then walks the
    weight-row blocks p, p + programs, ..., BLOCK_N rows each and all of K a step (BLOCK_K: K rounded up to a
    power of two), the next blocks' weights copied ahead by the loop pipeline, each block's products as in
    `_int4_gemv_kernel`. Up to K = 4096 the first block's weights are asked of L2 before the wait for x (on an
    H100, -0.75 us a layer for the 8B shape's products of K = 4096; more blocks, or down's, were slower). The
    arguments are the blocked gemv's (`_launch`); k_per_split, ss_ptr and SPLIT unused.
    Against that gemv, whose every program walks and rounds x again (1,792 programs for gate_up at 8B) and
    ramps its own pipeline up and down, a chain of 8 of the 8B shape's layers took 64.4 us a layer against 69.1
    on an H100, 63.4 with the prefetch (docs/benchmarks.md)."""
    KW_BLOCK: tl.constexpr = BLOCK_K // 8
    WORDS: tl.constexpr = G // 8
    GROUPS: tl.constexpr = KW_BLOCK // WORDS
    p, m, programs = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    NG = KW * 8 // G
    i = tl.arange(0, KW_BLOCK)  # word index
    in_k = i < KW
    g = tl.arange(0, GROUPS)
    x_row = x_ptr + m * stride_x
    if ASM and BLOCK_K <= 4096:  # before the wait, which x needs and the weights do not: the first block to L2
        LINES: tl.constexpr = max(KW_BLOCK // 32, 1)  # 128-byte lines a row
        rows, _ = _gemv_rows(p, N, BLOCK_N, SWIGLU)
        line = tl.arange(0, LINES) * 32  # the first word of each line
        first = w_ptr + tl.minimum(rows, N - 1)[:, None].to(tl.int64) * KW + tl.minimum(line, KW - 1)[None, :]
        tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [first], dtype=tl.int32,
                                  is_pure=False, pack=1)
    wait_for_inputs(PDL)
    p0, p1, p2, p3, d, x_sum, squares = _x16_step(x_row, g_ptr, i, in_k, 8, NORM, WORDS)  # d: [GROUPS]
    x_sum = tl.sum(tl.reshape(x_sum, [GROUPS, WORDS]), axis=1)  # [GROUPS]
    if NORM:  # the RMSNorm's 1 / rms(x), once
        inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / (KW * 8) + eps)
        d, x_sum = d * inv_rms, x_sum * inv_rms
    for b in tl.range(p, tl.cdiv(N, BLOCK_N), programs, num_stages=NUM_STAGES):
        n, row_ok = _gemv_rows(b, N, BLOCK_N, SWIGLU)  # [BLOCK_N]
        words = tl.load(w_ptr + n[:, None].to(tl.int64) * KW + i[None, :], mask=row_ok[:, None] & in_k[None, :],
                        other=0)  # [BLOCK_N, KW_BLOCK]
        ok = row_ok[:, None] & (g < NG)[None, :]
        s = tl.load(scales_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)
        mn = tl.load(mins_ptr + n[:, None] * NG + g[None, :], mask=ok, other=0.0).to(tl.float32)
        low, high = words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F
        dot = _dot2(p0[None, :], low, 0, False, False, ASM)
        dot = _dot2(p1[None, :], low, dot, True, False, ASM)
        dot = _dot2(p2[None, :], high, dot, False, False, ASM)
        dot = _dot2(p3[None, :], high, dot, True, False, ASM)  # [n, i]: sum_t v_t q[n, 8i + t]
        dot = tl.sum(tl.reshape(dot, [BLOCK_N, GROUPS, WORDS]), axis=2)  # [BLOCK_N, GROUPS]
        y = tl.sum(s * (dot.to(tl.float32) * d[None, :]) + mn * x_sum[None, :], axis=1)
        # (y already normalised, no splits: _finish's NORM and SPLIT off, its sum-of-squares pointer unused)
        _finish(out_ptr, y, m, n, M, N, 0, b, squares, KW * 8, out_ptr, res_ptr, eps, False, RESIDUAL, False, SWIGLU)
    let_next_start(PDL)


# Nibble t of each 16-bit unit (one per half of a 32-bit register) is ORed into the low mantissa bits of 128.0
# (bf16 0x4300: its last place is worth 1) or 1024.0 (fp16 0x6400), giving 128 + q or 1024 + q for both halves
# at once; a packed subtract makes q exact and a packed fma w = q s + mn, rounded once to x's dtype.
_UNITS_TO_WEIGHTS_PTX = " ".join("""
.reg .b32 t0, t1, t2, t3, magic;
mov.b32 magic, {magic};
lop3.b32 t0, $4, 0x000F000F, magic, 0xea;
shr.u32 t1, $4, 4;  lop3.b32 t1, t1, 0x000F000F, magic, 0xea;
shr.u32 t2, $4, 8;  lop3.b32 t2, t2, 0x000F000F, magic, 0xea;
shr.u32 t3, $4, 12; lop3.b32 t3, t3, 0x000F000F, magic, 0xea;
sub.rn.{type}x2 t0, t0, magic; sub.rn.{type}x2 t1, t1, magic;
sub.rn.{type}x2 t2, t2, magic; sub.rn.{type}x2 t3, t3, magic;
fma.rn.{type}x2 $0, t0, $5, $6; fma.rn.{type}x2 $1, t1, $5, $6;
fma.rn.{type}x2 $2, t2, $5, $6; fma.rn.{type}x2 $3, t3, $5, $6;
""".split())  # one line: Inductor copies this string into the Python source of a compiled graph
_BF16_UNITS_TO_WEIGHTS = tl.constexpr("{" + _UNITS_TO_WEIGHTS_PTX.format(magic="0x43004300", type="bf16") + "}")
_F16_UNITS_TO_WEIGHTS = tl.constexpr("{" + _UNITS_TO_WEIGHTS_PTX.format(magic="0x64006400", type="f16") + "}")


@triton.jit
def _units_to_weights(units, s, mn, ASM: tl.constexpr):
    """(w0, w1, w2, w3), w_t = q_t s + mn in s's dtype, for q_t = nibble t (bits 4t..4t+3) of each int16 unit;
    s and mn broadcast against units. ASM: two units a register in PTX (bf16 / fp16, on a GPU); otherwise w is
    computed in float32, then rounded to s's dtype (float32 x, and Triton's interpreter, which cannot run PTX)."""
    if ASM:
        if s.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_BF16_UNITS_TO_WEIGHTS, "=r,=r,=r,=r,r,r,r", [units, s, mn],
                                             dtype=(s.dtype,) * 4, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_F16_UNITS_TO_WEIGHTS, "=r,=r,=r,=r,r,r,r", [units, s, mn],
                                             dtype=(s.dtype,) * 4, is_pure=True, pack=2)
    else:
        dtype: tl.constexpr = s.dtype
        s, mn = s.to(tl.float32), mn.to(tl.float32)
        w0 = ((units & 15).to(tl.float32) * s + mn).to(dtype)
        w1 = (((units >> 4) & 15).to(tl.float32) * s + mn).to(dtype)
        w2 = (((units >> 8) & 15).to(tl.float32) * s + mn).to(dtype)
        w3 = (((units >> 12) & 15).to(tl.float32) * s + mn).to(dtype)
        return w0, w1, w2, w3


@triton.jit
def _int4_dot_step(acc, u_rows, x_rows, k0, s, mn, KU, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
                   EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] + the products of features k0 .. k0 + WIDTH: unit i of a row holds q[n, 4i + t] in
    nibble t, so a [BLOCK_N, WIDTH / 4] tile of units gives four weight tiles w_t[n, i] = w[n, 4i + t], each
    multiplied by x_t[m, i] = x[m, 4i + t] (x split four ways in registers). s, mn: [BLOCK_N, 1] or per unit."""
    i = k0 // 4 + tl.arange(0, WIDTH // 4)  # [WIDTH / 4] unit index
    k = k0 + tl.arange(0, WIDTH)  # [WIDTH]
    if EVEN_K:
        units = tl.load(u_rows + i[None, :])  # [BLOCK_N, WIDTH / 4]
        x = tl.load(x_rows + k[None, :])  # [BLOCK_M, WIDTH]
    else:  # past K: q = 0 and x = 0
        units = tl.load(u_rows + i[None, :], mask=(i < KU)[None, :], other=0)
        x = tl.load(x_rows + k[None, :], mask=(k < KU * 4)[None, :], other=0.0)
    w0, w1, w2, w3 = _units_to_weights(units, s, mn, ASM)
    # x[m, 4i + 2a + b] -> x_t[m, i] for t = 2a + b (tl.split takes the last dimension, of size 2)
    x02, x13 = tl.split(tl.reshape(x, [BLOCK_M, WIDTH // 4, 2, 2]))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    acc = tl.dot(w0, tl.trans(x0), acc, input_precision="ieee")  # "ieee": fp32 x without tf32 rounding
    acc = tl.dot(w1, tl.trans(x1), acc, input_precision="ieee")
    acc = tl.dot(w2, tl.trans(x2), acc, input_precision="ieee")
    return tl.dot(w3, tl.trans(x3), acc, input_precision="ieee")


@triton.jit
def _int4_dot_kernel(x_ptr, w_ptr, scales_ptr, mins_ptr, out_ptr, M, N, KU, k_per_split, stride_x, res_ptr, NG,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr, EVEN_K: tl.constexpr, RESIDUAL: tl.constexpr, ASM: tl.constexpr,
                     PDL: tl.constexpr):
    """Program (n block, m block, split): acc[n, m] = sum_k w[n, k] x[m, k] with tensor cores (`_int4_dot_step`),
    w_ptr: qweight viewed as int16 [N, KU], KU = K / 4; NG = K / G groups a row. A step of BLOCK_K features takes
    one scale and minimum per row when it lies in one group, a pair of them when it spans two groups (BLOCK_K =
    2 G: the pair is one 4-byte load per row, which the pipeline copies ahead, where 2-byte loads would be waited
    for), else one per unit (group 32, or a step over more groups)."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    # rows past N or M read the last row again (and are not stored): the loads need no masks
    rows = tl.minimum(n, N - 1)
    u_rows = w_ptr + rows[:, None].to(tl.int64) * KU  # [BLOCK_N, 1]
    x_rows = x_ptr + tl.minimum(m, M - 1)[:, None] * stride_x  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    start = split * k_per_split
    wait_for_inputs(PDL)
    for k0 in tl.range(start, tl.minimum(start + k_per_split, KU * 4), BLOCK_K, num_stages=NUM_STAGES):
        k0 = tl.multiple_of(k0, BLOCK_K)
        if BLOCK_K <= G:  # one group
            s = tl.load(scales_ptr + rows * NG + k0 // G)[:, None]  # [BLOCK_N, 1]
            mn = tl.load(mins_ptr + rows * NG + k0 // G)[:, None]
            acc = _int4_dot_step(acc, u_rows, x_rows, k0, s, mn, KU, BLOCK_M, BLOCK_K, EVEN_K, ASM)
        elif BLOCK_K == 2 * G and G >= 64:  # two groups, g and g + 1 (each 16 units wide at least)
            g = tl.multiple_of(k0 // G, 2) + tl.arange(0, 2)  # [2]
            pair = rows[:, None] * NG + g[None, :]  # [BLOCK_N, 2]
            s0, s1 = tl.split(tl.load(scales_ptr + pair, mask=(g < NG)[None, :], other=0.0))
            mn0, mn1 = tl.split(tl.load(mins_ptr + pair, mask=(g < NG)[None, :], other=0.0))
            acc = _int4_dot_step(acc, u_rows, x_rows, k0, s0[:, None], mn0[:, None], KU, BLOCK_M, G, EVEN_K, ASM)
            acc = _int4_dot_step(acc, u_rows, x_rows, k0 + G, s1[:, None], mn1[:, None], KU, BLOCK_M, G, EVEN_K,
                                 ASM)
        else:  # one scale and minimum per unit
            g = rows[:, None] * NG + ((k0 + 4 * tl.arange(0, BLOCK_K // 4)) // G)[None, :]  # [BLOCK_N, BLOCK_K / 4]
            in_k = (k0 + 4 * tl.arange(0, BLOCK_K // 4) < KU * 4)[None, :]
            s = tl.load(scales_ptr + g, mask=in_k, other=0.0)
            mn = tl.load(mins_ptr + g, mask=in_k, other=0.0)
            acc = _int4_dot_step(acc, u_rows, x_rows, k0, s, mn, KU, BLOCK_M, BLOCK_K, EVEN_K, ASM)
    let_next_start(PDL)
    _store(out_ptr, acc, m, n, M, N, split, res_ptr, RESIDUAL)


# ---------------------------------------------------------------------------- split-K
@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, M, N, K, ss_ptr, res_ptr, eps, SPLIT_K: tl.constexpr,
                       BLOCK: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """out[j] = sum_s partial[s, j] over the flattened [M, N] outputs; a gemv's NORM and RESIDUAL (`_finish`)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = j < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    sum_squares = tl.zeros([BLOCK], dtype=tl.float32)
    wait_for_inputs(PDL)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + s * M * N + j, mask=inside, other=0.0)
        if NORM:
            sum_squares += tl.load(ss_ptr + s * M + j // N, mask=inside, other=0.0)
    if NORM:
        acc = acc * tl.rsqrt(sum_squares / K + eps)
    if RESIDUAL:
        acc += tl.load(res_ptr + j, mask=inside, other=0.0).to(tl.float32)
    let_next_start(PDL)
    tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------- launch configs
@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_config(bits: int, M: int, N: int, K: int, sm_count: int, group_size: int = 0, x_itemsize: int = 2,
                   norm: bool = False, **overrides: int) -> dict[str, int]:
    """The launch config (keys CONFIG_KEYS) of an [M, K] x [N, K]^T product with `bits`-bit weights (8 or 4) on a
    GPU with `sm_count` SMs, `norm`: the gemv normalises x (`_finish`); the module docstring says why. Nonzero
    `overrides` replace single choices, and split_k, unless given, follows the tiles chosen."""
    overrides = {key: value for key, value in overrides.items() if value}
    assert set(overrides) <= set(CONFIG_KEYS), overrides
    block_m = 1 if M == 1 else 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    resident = K <= (16384 if group_size in (32, 64) else 4096 if group_size == 128 else 0)  # (H100 chains)
    if overrides.get("block_m", block_m) == 1 and bits == 4 and (resident or "programs" in overrides) and not {
            "block_k", "split_k"} & set(overrides):  # the persistent gemv (x in registers: 64 a thread at 16384)
        config = dict(block_m=1, block_n=4 if K <= 4096 else 2, block_k=8 * triton.next_power_of_2(K // 8),
                      split_k=1, num_warps=4, num_stages=3, programs=3 if K <= 4096 else 2)
    elif overrides.get("block_m", block_m) == 1:
        config = dict(block_m=1, block_n=16 if triton.cdiv(N, 16) >= sm_count else 8, block_k=8192 // bits,
                      num_warps=4, num_stages=3)
        if bits == 4:  # the H100 sweep: half a KB of each row a step from 8k rows on, else 1 KB
            config |= dict(block_k=1024 if N >= 8192 else 2048)
        if norm:  # the H100 sweep with the norm inside: half a KB of each row a step
            config |= dict(block_k=4096 // bits)
    elif bits == 8 and block_m == 128:  # a prefill's rows (the module docstring says why not 8 warps)
        config = dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif bits == 8:
        config = dict(block_m=block_m, block_n=64, block_k=256 if block_m == 16 else 128, num_warps=4, num_stages=4)
    else:  # int4: two groups a step (one 4-byte load of their scales per row), 64 to 256 features
        block_k = 2 * group_size if 64 <= group_size <= 128 else max(64, min(group_size, 256))
        if block_m == 128 and group_size <= 64:  # (mma.sync: 128-row tiles were not faster at 128 rows)
            block_m = 64
        config = dict(block_m=block_m, block_n=64, block_k=block_k, num_warps=2, num_stages=3)  # mma.sync
        if block_m > 16 and group_size > 64:  # wgmma, the H100 sweeps' best for 64 rows of groups of 128
            config |= dict(block_n=128, num_warps=4)
        elif block_m == 16 and group_size == 128 and x_itemsize == 2:  # the bf16 sweep's best, -5% to -16%
            config |= dict(block_n=32, num_warps=1)
        if x_itemsize == 4:  # float32 x tiles: half the features a step and two stages fit shared memory
            config |= dict(block_k=min(block_k, 128), num_stages=2)
    config = dict(programs=0) | config | overrides
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    assert not config["programs"] or (bits == 4 and bm == 1 and bk >= K), f"programs: the one-row int4 kernel, {config}"
    assert bm == 1 or bm >= 16, f"block_m={bm}: 1 (gemv) or at least 16 (tl.dot)"
    smallest = 32 // bits if bm == 1 else 64 if bits == 4 else 16  # (int4 dot: four tl.dot of bk / 4 features)
    assert bk & (bk - 1) == 0 and bk >= smallest, f"block_k={bk}: a power of two, >= {smallest}"
    if "split_k" not in config:
        blocks, split_k = triton.cdiv(N, bn) * (M if bm == 1 else triton.cdiv(M, bm)), 1
        wanted = 2 * sm_count if bits == 4 and bm == 16 else sm_count  # (H100: 2-3 mma.sync programs an SM)
        while blocks * split_k < wanted and K >= 4 * split_k * bk:
            split_k *= 2
        config["split_k"] = split_k
    return {key: config[key] for key in CONFIG_KEYS}


def _launch(kernel, x: Tensor, words: Tensor, meta: tuple[Tensor, ...], N: int, config: dict[str, int], *tail,
            norm_weight: Tensor | None = None, eps: float = 0.0, residual: Tensor | None = None,
            swiglu: bool = False, **constexprs) -> Tensor:
    """Run a gemv (block_m = 1) or dot kernel on x [M, K] and words [N, KW], then add up the splits; -> y [M, N] =
    residual + rms_norm(x) W^T (`llama.model.rms_norm`; each part only when given), or with swiglu
    `llama.model.silu_mul` of rms_norm(x) W^T, [M, N / 2]. The residual is added before the output's one rounding;
    the gemvs normalise x and apply SwiGLU inside (`_finish`; SwiGLU without split-K), the dot kernels take x
    normalised and SwiGLU is applied after them."""
    M, K = x.shape
    if swiglu and config["block_m"] == 1:
        config = config | dict(split_k=1)
    bm, bn, bk, split_k = config["block_m"], config["block_n"], config["block_k"], config["split_k"]
    if bm > 1 and norm_weight is not None:
        x, norm_weight = rms_norm(x, norm_weight, eps), None
    if x.stride(1) != 1 or x.stride(0) % 2 or x.storage_offset() % 2:  # the gemv reads 16-bit x as int32 pairs
        x = x.clone(memory_format=torch.contiguous_format)
    if norm_weight is not None and norm_weight.storage_offset() % 2:  # (and the norm's weight as x)
        norm_weight = norm_weight.clone()
    k_per_split = bk * triton.cdiv(triton.cdiv(K, bk), split_k)  # a multiple of BLOCK_K
    out = x.new_empty(M, N // 2 if swiglu and bm == 1 else N)
    target = out if split_k == 1 else x.new_empty(split_k, M, N, dtype=torch.float32)
    norm, add = norm_weight is not None, residual is not None
    residual = residual.contiguous() if add else target  # (a pointer the kernels never read without `add`)
    squares = x.new_empty(split_k, M, dtype=torch.float32) if norm and split_k > 1 else target
    if bm > 1:
        tail = (residual, *tail)
        constexprs |= dict(BLOCK_M=bm, RESIDUAL=add and split_k == 1)
    else:
        tail = (norm_weight if norm else x, residual, squares, eps, *tail)
        constexprs |= dict(NORM=norm, RESIDUAL=add, SPLIT=split_k > 1, SWIGLU=swiglu)
    blocks = triton.cdiv(N, bn)
    if config["programs"]:  # persistent: each program walks blocks p, p + programs, ...
        blocks = min(blocks, config["programs"] * _sm_count(x.device))
    launch(kernel, (blocks, M if bm == 1 else triton.cdiv(M, bm), split_k),
           x, words, *meta, target, M, N, words.shape[1], k_per_split, x.stride(0), *tail, BLOCK_N=bn, BLOCK_K=bk,
           NUM_STAGES=config["num_stages"], num_warps=config["num_warps"], num_stages=config["num_stages"],
           **constexprs)
    if split_k > 1:
        block = 1024
        launch(_sum_splits_kernel, (triton.cdiv(M * N, block),), target, out, M, N, K, squares, residual, eps,
               SPLIT_K=split_k, BLOCK=block, NORM=norm, RESIDUAL=add, num_warps=4)
    return silu_mul(out) if swiglu and bm > 1 else out


# ---------------------------------------------------------------------------- the ops
@torch.library.custom_op("llama::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, weight: Tensor, scale: Tensor, norm_weight: Tensor | None = None, eps: float = 0.0,
                 residual: Tensor | None = None, swiglu: bool = False, block_m: int = 0, block_n: int = 0,
                 block_k: int = 0, split_k: int = 0, num_warps: int = 0, num_stages: int = 0,
                 programs: int = 0) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    config = default_config(8, M, N, K, _sm_count(x.device), norm=norm_weight is not None, block_m=block_m,
                            block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                            num_stages=num_stages, programs=programs)
    ends = dict(norm_weight=norm_weight, eps=eps, residual=residual, swiglu=swiglu)
    if config["block_m"] == 1:
        return _launch(_int8_gemv_kernel, x, weight.view(torch.int32), (scale,), N, config, **ends, ASM=x.is_cuda)
    return _launch(_int8_dot_kernel, x, weight.view(torch.int32), (scale,), N, config, MAGIC, **ends)


@torch.library.custom_op("llama::int4_linear", mutates_args=())
def _int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int,
                 norm_weight: Tensor | None = None, eps: float = 0.0, residual: Tensor | None = None,
                 swiglu: bool = False, block_m: int = 0, block_n: int = 0, block_k: int = 0, split_k: int = 0,
                 num_warps: int = 0, num_stages: int = 0, programs: int = 0) -> Tensor:
    M, K = x.shape
    N = qweight.shape[0]
    config = default_config(4, M, N, K, _sm_count(x.device), group_size, x.element_size(), norm_weight is not None,
                            block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                            num_stages=num_stages, programs=programs)
    ends = dict(norm_weight=norm_weight, eps=eps, residual=residual, swiglu=swiglu)
    if config["block_m"] == 1:  # the persistent gemv (`programs` a SM) or the blocked one
        kernel = _int4_gemv_resident_kernel if config["programs"] else _int4_gemv_kernel
        return _launch(kernel, x, qweight.view(torch.int32), (scales, mins), N, config, **ends, G=group_size,
                       ASM=x.is_cuda)
    return _launch(_int4_dot_kernel, x, qweight.view(torch.int16), (scales, mins), N, config, K // group_size,
                   **ends, G=group_size, EVEN_K=K % config["block_k"] == 0,
                   ASM=x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))


@_int8_linear.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, norm_weight: Tensor | None = None, eps: float = 0.0,
      residual: Tensor | None = None, swiglu: bool = False, *config: int) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0])


@_int4_linear.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, norm_weight: Tensor | None = None,
      eps: float = 0.0, residual: Tensor | None = None, swiglu: bool = False, *config: int) -> Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0] // 2 if swiglu else qweight.shape[0])


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, *, norm_weight: Tensor | None = None, eps: float = 0.0,
                residual: Tensor | None = None, swiglu: bool = False, block_m: int = 0, block_n: int = 0,
                block_k: int = 0, split_k: int = 0, num_warps: int = 0, num_stages: int = 0,
                programs: int = 0) -> Tensor:
    """x [M, K] (bf16, fp16 or fp32), weight int8 [N, K], scale [N] in x's dtype -> y [M, N] in x's dtype:

        y[m, n] = scale[n] * sum_k x[m, k] weight[n, k]        (float32 sums)

    With norm_weight [K] (and eps), x is first normalised as `llama.model.rms_norm` does; with residual [M, N],
    it is added to y; with swiglu, y [M, N / 2] is `llama.model.silu_mul` of the product (all three inside the
    GEMV, around it for the tl.dot kernel: `_launch`). K must be a multiple of 4 (the weight is read as int32
    words). The other keywords override `default_config` (0: the default); block_m = 1 is the GEMV kernel,
    block_m >= 16 the tl.dot one."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert weight.dtype == torch.int8 and weight.is_contiguous() and weight.shape[1] % 4 == 0, "int8 [N, K], K % 4 = 0"
    assert scale.shape == (weight.shape[0],) and scale.is_contiguous(), scale.shape
    _check_ends(x, weight.shape[0], norm_weight, residual, swiglu)
    return _int8_linear(x, weight, scale, norm_weight, eps, residual, swiglu, block_m, block_n, block_k, split_k,
                        num_warps, num_stages, programs)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, *,
                norm_weight: Tensor | None = None, eps: float = 0.0, residual: Tensor | None = None,
                swiglu: bool = False, block_m: int = 0, block_n: int = 0, block_k: int = 0, split_k: int = 0,
                num_warps: int = 0, num_stages: int = 0, programs: int = 0) -> Tensor:
    """x [M, K] (bf16, fp16 or fp32), qweight uint8 [N, K / 2], scales and mins [N, K / G] in x's dtype, G =
    group_size in {32, 64, 128, 256} dividing K -> y [M, N] in x's dtype:

        q[n, 2j] = qweight[n, j] & 15,  q[n, 2j + 1] = qweight[n, j] >> 4
        w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
        y = x @ w.T                                             (float32 sums)

    norm_weight, eps, residual and swiglu as in `int8_linear`. The other keywords override `default_config` (0: the
    default); block_m = 1 is the GEMV kernel, block_m >= 16 the tl.dot one."""
    N, K = qweight.shape[0], x.shape[1]
    assert x.dim() == 2 and group_size in (32, 64, 128, 256) and K % group_size == 0, (x.shape, group_size)
    assert qweight.dtype == torch.uint8 and qweight.shape == (N, K // 2) and qweight.is_contiguous(), qweight.shape
    assert scales.shape == mins.shape == (N, K // group_size) and scales.is_contiguous() and mins.is_contiguous()
    _check_ends(x, N, norm_weight, residual, swiglu)
    return _int4_linear(x, qweight, scales, mins, group_size, norm_weight, eps, residual, swiglu, block_m, block_n,
                        block_k, split_k, num_warps, num_stages, programs)


def _check_ends(x: Tensor, N: int, norm_weight: Tensor | None, residual: Tensor | None, swiglu: bool) -> None:
    assert norm_weight is None or (norm_weight.shape == x.shape[1:] and norm_weight.is_contiguous()), norm_weight
    assert residual is None or (residual.shape == (x.shape[0], N) and residual.dtype == x.dtype), residual
    assert not swiglu or (N % 2 == 0 and residual is None), "swiglu: an even N (gate, then up), no residual"
