"""Two Triton kernels for the compiled GPU path (`compile=True`); the model computes the same functions without them
(model.py: `silu_mul`, `sdpa_attention`). Measured on an H100 in docs/benchmarks.md ("Batch 1, third look").

silu_mul          silu(gate) * up, written to memory by a kernel of its own. Left to itself, Inductor fuses this
                  product into the batch-1 down_proj matrix-vector kernel and recomputes it in every program of
                  that kernel: 42-51 us per layer (it varies with the tuning), against 39-41 us for the same kernel
                  reading the product from memory. A Triton kernel is opaque to Inductor's fusion, so the product
                  is materialised (28 KB at batch 1, 1.2 us).
decode_attention  one query token per row against the KV cache, flash-decoding style, reading only slots up to
                  each row's position: 3.3 us + 1.6 us (combine) per layer at the benchmark's batch 1, against
                  7.7 us for cuDNN through SDPA plus 1 us for the mask it needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, F, BLOCK: tl.constexpr):
    """One row of gate_up [2F] per program along axis 0; out[f] = silu(gate[f]) * up[f], rounded as eager."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    gate = tl.load(gate_up_ptr + row * 2 * F + cols, mask=ok).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * F + F + cols, mask=ok)
    silu = (gate * tl.sigmoid(gate)).to(up.dtype)  # eager rounds silu's output to the model dtype
    tl.store(out_ptr + row * F + cols, silu * up, mask=ok)


@torch.library.triton_op("llama::silu_mul", mutates_args=())
def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2F] (gate then up, contiguous) -> silu(gate) * up [..., F]."""
    F = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], F)
    rows = gate_up.numel() // (2 * F)
    block = 1024
    torch.library.wrap_triton(_silu_mul_kernel)[(rows, triton.cdiv(F, block))](gate_up, out, F, BLOCK=block)
    return out


# ---------------------------------------------------------------------------- decode attention
@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, S, split_len, scale,
                             N_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_S: tl.constexpr, SINGLE: tl.constexpr):
    """Program (b * N_KV + kv head, split): the G query heads of one kv head against one split of the cache slots
    0..pos[b], with an online softmax over BLOCK_S slots at a time. One split: the normalised output; several:
    float32 partial sums plus the running max and sum of each head, combined by `_combine_kernel`."""
    b, kv_head, split = tl.program_id(0) // N_KV, tl.program_id(0) % N_KV, tl.program_id(1)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    heads = kv_head * G + g  # [G_PAD]; rows >= G are padding (tl.dot wants 16 rows)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G, other=0.0)
    running_max = tl.full([G_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    kv = b * stride_kb + kv_head * stride_kh
    end = tl.minimum(tl.minimum(split * split_len + split_len, S), tl.load(pos_ptr + b) + 1)  # slots beyond: unread
    for s0 in range(split * split_len, end, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        visible = slots < end  # [BLOCK_S]
        k = tl.load(k_ptr + kv + slots[:, None] * stride_ks + d[None, :], mask=visible[:, None], other=0.0)
        scores = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # [G_PAD, BLOCK_S]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv + slots[:, None] * stride_ks + d[None, :], mask=visible[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        running_max = new_max
    H = N_KV * G
    if SINGLE:
        tl.store(out_ptr + (b * H + heads)[:, None] * D + d[None, :],
                 (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=g[:, None] < G)
    else:
        index = (b * H + heads) * tl.num_programs(1) + split  # [G_PAD]
        tl.store(acc_ptr + index[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
        tl.store(max_ptr + index, running_max, mask=g < G)
        tl.store(sum_ptr + index, running_sum, mask=g < G)


@triton.jit
def _combine_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, n_splits, D: tl.constexpr, SPLITS: tl.constexpr):
    """One program per (b, head): out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i over the splits i."""
    row = tl.program_id(0)
    i, d = tl.arange(0, SPLITS), tl.arange(0, D)
    ok = i < n_splits
    m = tl.load(max_ptr + row * n_splits + i, mask=ok, other=float("-inf"))
    weight = tl.exp(m - tl.max(m, axis=0))  # splits that saw no visible slot have m = -inf: weight 0
    total = tl.sum(tl.load(sum_ptr + row * n_splits + i, mask=ok, other=0.0) * weight, axis=0)
    acc = tl.load(acc_ptr + (row * n_splits + i)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(out_ptr + row * D + d, (tl.sum(acc * weight[:, None], axis=0) / total).to(out_ptr.dtype.element_ty))


@torch.library.triton_op("llama::decode_attention", mutates_args=())
def _decode_attention(q: Tensor, k: Tensor, v: Tensor, position: Tensor) -> Tensor:
    B, H, _, D = q.shape
    N_KV, S = k.shape[1], k.shape[2]
    G = H // N_KV
    block = 64
    programs_wanted = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2)
    split_len = block * triton.cdiv(triton.cdiv(B * N_KV * S, programs_wanted), block)  # a multiple of block
    n_splits = triton.cdiv(S, split_len)
    out = q.new_empty(B, H, 1, D)
    acc = q.new_empty(B * H * n_splits, D, dtype=torch.float32)
    running_max, running_sum = (q.new_empty(B * H * n_splits, dtype=torch.float32) for _ in range(2))
    torch.library.wrap_triton(_decode_attention_kernel)[(B * N_KV, n_splits)](
        q, k, v, position, out, acc, running_max, running_sum, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k.stride(2), S, split_len, D**-0.5, N_KV=N_KV, G=G, G_PAD=max(16, triton.next_power_of_2(G)),
        D=D, BLOCK_S=block, SINGLE=n_splits == 1, num_warps=4)
    if n_splits > 1:
        torch.library.wrap_triton(_combine_kernel)[(B * H,)](
            acc, running_max, running_sum, out, n_splits, D=D, SPLITS=triton.next_power_of_2(n_splits))
    return out


def decode_attention(q: Tensor, k: Tensor, v: Tensor, position: Tensor) -> Tensor:
    """Attention of one new token per row over the cache, split across the GPU (flash-decoding): the cache is cut
    into splits so that even one row keeps every SM busy, each split reduces with an online softmax, and a second
    kernel combines the splits. q: [B, H, 1, D]; k, v: [B, K, S, D] (each kv head read once for its G query
    heads, no copies; D a power of two, >= 16); position: [B, 1], row b sees slots 0..position[b] (no mask
    tensor: slots past it are not even read). The same function as `sdpa_attention` with the decode mask."""
    assert q.shape[2] == 1 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride() == k.stride()
    return _decode_attention(q, k, v, position.reshape(q.shape[0]).contiguous())
