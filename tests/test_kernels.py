"""The Triton kernels of the compiled GPU path (llama/kernels.py) against the model's own functions and torch.topk
(outputs, and the KV cache the attention kernel writes), run by Triton's interpreter on the CPU in float32.
Skipped where Triton is not installed (the CPU-only CI); on a GPU, scripts/gpu_check.py and
scripts/batch1_kernels.py check them in bf16."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import copy
import torch
from llama.config import ModelConfig, RopeConfig
from llama.kernels import decode_attention, kth_largest, silu_mul
from llama.model import KVCache, RotaryEmbedding, apply_rope, reference_attention, silu_mul as reference_silu_mul
torch.manual_seed(0)
ropes = [RopeConfig(), RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=128),  # (cos, sin scaled)
         RopeConfig(type="dynamic", factor=2.0), RopeConfig(type="llama3", theta=500000.0, factor=8.0,
                                                            original_max_position_embeddings=64)]
for (B, H, K, S, D), rope in zip([(1, 8, 2, 100, 64), (3, 4, 4, 300, 64), (2, 16, 2, 1000, 128), (1, 8, 8, 64, 64)],
                                 ropes):
    config = ModelConfig(vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=K, head_dim=D, ffn_dim=8,
                         max_position_embeddings=256, rope=rope)
    rotary = RotaryEmbedding(config)
    qkv = torch.randn(B, 1, (H + 2 * K) * D)  # the q, k and v of each row are views into it, as in the model
    q, k, v = (x.view(B, 1, -1, D).transpose(1, 2) for x in qkv.split([H * D, K * D, K * D], dim=-1))
    cache = KVCache(B + 1, S, K, D)  # more rows than in use
    cache.k.normal_(), cache.v.normal_()
    expected_cache = copy.deepcopy(cache)
    position = torch.randint(0, S, (B, 1))
    position[0, 0] = S - 1
    cos, sin = rotary(position, qkv.dtype)
    out = decode_attention(qkv, cache, position, rotary)
    k_all, v_all = expected_cache.update(position, apply_rope(k, cos, sin), v)
    mask = (torch.arange(S) <= position[:, :, None]).unsqueeze(1)
    ref = reference_attention(apply_rope(q, cos, sin).double(), k_all.double(), v_all.double(), mask)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error < 1e-5, (B, H, K, S, D, error)
    assert torch.allclose(cache.k, expected_cache.k, atol=1e-6) and torch.equal(cache.v, expected_cache.v)
for dtype in (torch.bfloat16, torch.float32):  # the k-th largest logit: ties, negative values, k past the end
    for x in (torch.randn(2, 3000) * 4, torch.randint(-3, 3, (2, 3000)).float(), -torch.rand(1, 700)):
        for k in (1, 7, 200, x.shape[1] - 1, x.shape[1], x.shape[1] + 5):  # k >= V: -inf, every value kept
            want = torch.topk(x.to(dtype).float(), k).values.amin(-1, keepdim=True).to(dtype) if k < x.shape[1] \
                else torch.full((x.shape[0], 1), float("-inf"), dtype=dtype)
            assert torch.equal(kth_largest(x.to(dtype), torch.tensor(k)), want), (dtype, k)
gate_up = torch.randn(2, 3, 2 * 700)
assert torch.allclose(silu_mul(gate_up), reference_silu_mul(gate_up), rtol=1e-5, atol=1e-6)
print("ok")
"""


# The ops are custom ops that launch their kernels themselves (kernels.launch), so a compiled graph sees only what
# each op declares: its fake implementation (output shapes, dtypes and strides) and which inputs it mutates.
# torch.library.opcheck runs each op for real (here in the interpreter) beside its fake, under Dynamo and AOT
# dispatch, and fails on any difference, or on an input mutated that the schema does not declare.
OPCHECK = """
import torch
from torch.library import opcheck
from llama.kernels import _decode_attention, _kth_largest, silu_mul
from llama.quant_kernels import _int4_linear, _int8_linear
torch.manual_seed(0)
B, H, K, S, D = 1, 4, 2, 70, 16
k_cache, v_cache = torch.randn(2, K, S, D), torch.randn(2, K, S, D)
opcheck(_decode_attention, (torch.randn(B, (H + 2 * K) * D), torch.rand(D // 2), k_cache, v_cache, torch.tensor([40]),
                            1.0))
opcheck(_kth_largest, (torch.randn(2, 300), torch.tensor([3, 300], dtype=torch.int32)))
opcheck(silu_mul, (torch.randn(2, 3, 64),))
x, g, residual = torch.randn(1, 64), torch.rand(64) + 0.5, torch.randn(1, 48)
q8, scale = torch.randint(-127, 128, (48, 64), dtype=torch.int8), torch.rand(48)
q4, scales, mins = torch.randint(0, 256, (48, 32), dtype=torch.uint8), torch.rand(48, 2), torch.rand(48, 2)
for ends in [(None, 0.0, None, False), (g, 1e-5, residual, False), (g, 1e-5, None, True)]:
    for rows in (1, 2):  # the gemv and the tl.dot kernel
        opcheck(_int8_linear, (x.expand(rows, 64).contiguous(), q8, scale, *ends[:2],
                               None if ends[2] is None else ends[2].expand(rows, 48).contiguous(), ends[3]))
        opcheck(_int4_linear, (x.expand(rows, 64).contiguous(), q4, scales, mins, 32, *ends[:2],
                               None if ends[2] is None else ends[2].expand(rows, 48).contiguous(), ends[3]))
print("ok")
"""


def run_interpreted(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
def test_kernels_match_the_model_in_the_interpreter():
    run_interpreted(CHECK)


@needs_triton
def test_custom_ops_declare_their_outputs_and_mutations():
    run_interpreted(OPCHECK)
