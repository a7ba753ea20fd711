"""Batch-1 decode pieces, each replayed from a CUDA graph that cycles through copies of its weights (so that no
weight is served from the 50 MB L2 cache), in the variants compared in docs/benchmarks.md ("Batch 1, third look"):

    python scripts/batch1_kernels.py

1. down(silu(gate) * up): eager (cuBLAS), Inductor fusing silu into its matrix-vector kernel (what `compile=True`
   generated before kernels.silu_mul), and Inductor given the product already in memory.
2. Decode attention of one layer: SDPA (cuDNN) against the Triton `decode_attention` (`--attention`: this alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth  # noqa: E402
from decode_variants import graph_time  # noqa: E402

C, F_, H, K, D = 4096, 14336, 32, 8, 128  # Llama-3.1-8B
dev, bf16 = torch.device("cuda"), torch.bfloat16


def weights(rows: int, cols: int) -> list[torch.Tensor]:
    """Enough copies of a [rows, cols] matrix to span 400 MB: a graph cycling through them never hits L2."""
    copies = max(2, -(-400_000_000 // (rows * cols * 2)))
    return [torch.randn(rows, cols, device=dev, dtype=bf16) * 0.02 for _ in range(copies)]


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def down_variants(bandwidth: float) -> None:
    ws = weights(C, F_)
    gate_up = torch.randn(2 * F_, device=dev, dtype=bf16)

    def eager(gu, w):
        return F.linear((F.silu(gu[:F_]) * gu[F_:])[None], w)[0]

    inductor = torch.compile(eager, fullgraph=True)
    hidden = (F.silu(gate_up[:F_]) * gate_up[F_:])[None]
    plain = torch.compile(lambda h, w: F.linear(h, w), fullgraph=True)
    seconds = graph_time([lambda w=w: plain(hidden, w) for w in ws], repeat=20)
    print(f"down Inductor, silu(gate) * up given  {seconds * 1e6:6.1f} us", flush=True)
    gu64 = gate_up.double()
    ref = (F.silu(gu64[:F_]) * gu64[F_:]) @ ws[0].double().T
    floor = C * F_ * 2 / bandwidth
    for name, fn in (("eager (cuBLAS + silu kernels)", eager), ("Inductor, silu fused", inductor)):
        seconds = graph_time([lambda w=w: fn(gate_up, w) for w in ws], repeat=20)
        print(f"down {name:32s} {seconds * 1e6:6.1f} us  {C * F_ * 2 / seconds / 1e9:5.0f} GB/s  floor "
              f"{floor * 1e6:5.1f} us  rel. error {rel_error(fn(gate_up, ws[0]), ref):.1e}", flush=True)


def attention_variants(bandwidth: float) -> None:
    """Decode attention, one layer: SDPA with the bool mask (cuDNN picks it up) against `decode_attention`, at
    the benchmark's shapes and at long context; errors against float64."""
    from llama.kernels import decode_attention
    from llama.model import reference_attention, sdpa_attention

    for B, S in ((1, 384), (1, 4096), (1, 32768), (16, 384), (64, 768)):
        qs = [torch.randn(B, 1, H, D, device=dev, dtype=bf16).transpose(1, 2) for _ in range(4)]
        k, v = (torch.randn(B, K, S, D, device=dev, dtype=bf16) for _ in range(2))
        position = torch.randint(S // 2, S, (B, 1), device=dev)
        position[0, 0] = S - 1
        mask = (torch.arange(S, device=dev) <= position[:, :, None]).unsqueeze(1)
        ref = reference_attention(qs[0].double(), k.double(), v.double(), mask)
        row = []
        for name, fn, arg in (("sdpa", sdpa_attention, mask), ("decode_attention", decode_attention, position)):
            seconds = graph_time([lambda q=q, fn=fn, arg=arg: fn(q, k, v, arg) for q in qs], repeat=20)
            error = rel_error(fn(qs[0], k, v, arg), ref)
            row.append(f"{name} {seconds * 1e6:7.1f} us (error {error:.1e})")
        kv_bytes = 2 * B * K * S * D * 2
        print(f"attention B={B:2d} S={S:5d} | " + " | ".join(row) + f" | KV at the copy rate "
              f"{kv_bytes / bandwidth * 1e6:6.1f} us", flush=True)


def main() -> None:
    torch._inductor.config.coordinate_descent_tuning = True  # as `compile=True` sets it
    bandwidth = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s",
          flush=True)
    for part in (attention_variants, down_variants)[:1 if "--attention" in sys.argv else 2]:
        try:
            part(bandwidth)
        except Exception as e:  # report and go on: one failing experiment must not hide the others
            print(f"{part.__name__}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
