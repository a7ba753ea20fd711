"""Batch-1 decode pieces, each replayed from a CUDA graph that cycles through copies of its weights (so that no
weight is served from the 50 MB L2 cache), in the variants compared in docs/benchmarks.md ("Batch 1, third look"):

    python scripts/batch1_kernels.py

1. down(silu(gate) * up): eager (cuBLAS), Inductor fusing silu into its matrix-vector kernel (what `compile=True`
   generated before kernels.silu_mul), and Inductor given the product already in memory.
2. Decode attention of one layer: SDPA (cuDNN) against the Triton `decode_attention` (`--attention`: this alone),
   which also rotates q and k and writes the cache (SDPA's time is the attention alone).
3. The k-th largest logit for top-k: the Triton `kth_largest` against `torch.topk` (`--top-k`: this alone).
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
    """Decode attention, one layer: SDPA with the bool mask (cuDNN picks it up) on the rotated query and the
    updated cache, against `decode_attention`, which also rotates q and k and writes k and v into the cache; at
    the benchmark's shapes and at long context; errors against float64."""
    import copy
    import json

    from llama.config import ModelConfig
    from llama.kernels import decode_attention
    from llama.model import KVCache, RotaryEmbedding, apply_rope, reference_attention, sdpa_attention

    config_file = Path(__file__).resolve().parent.parent / "configs" / "llama-3.1-8b.json"
    rope = RotaryEmbedding(ModelConfig.from_hf_config(json.loads(config_file.read_text()))).to(dev)

    for B, S in ((1, 384), (1, 4096), (1, 32768), (16, 384), (64, 768)):
        qkvs = [torch.randn(B, 1, (H + 2 * K) * D, device=dev, dtype=bf16) for _ in range(4)]
        heads = [[x.view(B, 1, -1, D).transpose(1, 2) for x in qkv.split([H * D, K * D, K * D], dim=-1)]
                 for qkv in qkvs]  # q, k, v of each, as views into the projection's output
        cache = KVCache(B, S, K, D, dtype=bf16, device=dev)
        cache.k.normal_(), cache.v.normal_()
        position = torch.randint(S // 2, S, (B, 1), device=dev)
        position[0, 0] = S - 1
        cos, sin = rope(position, bf16)
        mask = (torch.arange(S, device=dev) <= position[:, :, None]).unsqueeze(1)
        q, k, v = heads[0]
        k_all, v_all = copy.deepcopy(cache).update(position, apply_rope(k, cos, sin), v)
        q_rotated = apply_rope(q, cos, sin)
        ref = reference_attention(q_rotated.double(), k_all.double(), v_all.double(), mask)
        sdpa = graph_time([lambda q=apply_rope(h[0], cos, sin): sdpa_attention(q, k_all, v_all, mask)
                           for h in heads], repeat=20)
        kernel = graph_time([lambda qkv=qkv: decode_attention(qkv, cache, position, rope) for qkv in qkvs],
                            repeat=20)
        errors = [rel_error(sdpa_attention(q_rotated, k_all, v_all, mask), ref),
                  rel_error(decode_attention(qkvs[0], copy.deepcopy(cache), position, rope), ref)]
        kv_bytes = 2 * B * K * S * D * 2
        print(f"attention B={B:2d} S={S:5d} | sdpa {sdpa * 1e6:7.1f} us (error {errors[0]:.1e}) | decode_attention, "
              f"with RoPE and the cache write {kernel * 1e6:7.1f} us (error {errors[1]:.1e}) | KV at the copy rate "
              f"{kv_bytes / bandwidth * 1e6:6.1f} us", flush=True)


def top_k_variants(bandwidth: float) -> None:
    """The k-th largest logit for top-k sampling: `kernels.kth_largest` (k a tensor) against `torch.topk`, checked
    equal, then timed at k = 200 over 128,256 bf16 logits."""
    from llama.kernels import kth_largest

    V = 128256
    for B in (1, 16, 64):
        x = torch.randn(B, V, device=dev, dtype=bf16) * 3
        for k in (1, 50, 200, V):
            ours = kth_largest(x, torch.tensor(k, device=dev))
            assert torch.equal(ours, torch.topk(x, k, sorted=False).values.amin(-1, keepdim=True)), (B, k)
        k = torch.full((B,), 200, device=dev)
        ours = graph_time([lambda x=x, k=k: kth_largest(x, k)], repeat=20)
        theirs = graph_time([lambda x=x: torch.topk(x, 200, sorted=False).values.amin(-1, keepdim=True)], repeat=20)
        print(f"k-th largest B={B:2d} | kth_largest {ours * 1e6:6.1f} us | torch.topk {theirs * 1e6:6.1f} us",
              flush=True)
    x = torch.randn(2, V, device=dev) * 3  # float32: four radix passes
    assert torch.equal(kth_largest(x, torch.tensor(200, device=dev)), torch.topk(x, 200).values.amin(-1, keepdim=True))


def main() -> None:
    torch._inductor.config.coordinate_descent_tuning = True  # as `compile=True` sets it
    bandwidth = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s",
          flush=True)
    parts = {"--attention": attention_variants, "--top-k": top_k_variants}
    chosen = [parts[a] for a in sys.argv[1:] if a in parts]
    for part in chosen or [attention_variants, top_k_variants, down_variants]:
        try:
            part(bandwidth)
        except Exception as e:  # report and go on: one failing experiment must not hide the others
            print(f"{part.__name__}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
