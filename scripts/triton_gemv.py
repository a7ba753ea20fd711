"""A hand-written matrix-vector product in Triton: the batch-1 experiment of `decode_variants.py --batch1`.

Not used by the engine. Alone, it takes 4-16% less time than cuBLAS's GEMV on an H100 (each Llama-3.1-8B
shape); inside the compiled decode step it is no faster than what Inductor already generates there (a GEMV
reduction with the RMSNorm before it fused in), so the engine keeps Inductor's. Numbers in docs/benchmarks.md.

Each program owns BLOCK_N rows of W, walks along K in BLOCK_K-wide tiles, multiplies them by the matching piece
of x and keeps float32 partial sums, reduced once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for n, k, w, s in [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3),
                                (32, 256, 4, 3), (32, 256, 8, 4), (64, 128, 4, 4), (64, 256, 8, 3)]],
    key=["N", "K"],
)
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)  # [BLOCK_K]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


@torch.library.triton_op("llama_experiments::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [K] (contiguous), weight [N, K] (rows contiguous) -> W x [N], accumulated in float32."""
    N, K = weight.shape
    y = x.new_empty(N)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    torch.library.wrap_triton(_gemv_kernel)[grid](x, weight, y, N, K, weight.stride(0))
    return y
