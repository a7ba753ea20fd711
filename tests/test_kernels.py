"""The Triton kernels of the compiled GPU path (llama/kernels.py) against the model's own functions, run by
Triton's interpreter on the CPU in float32. Skipped where Triton is not installed (the CPU-only CI); on a GPU,
scripts/gpu_check.py and scripts/batch1_kernels.py check them in bf16."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import torch
from llama.kernels import decode_attention, silu_mul
from llama.model import reference_attention, silu_mul as reference_silu_mul
torch.manual_seed(0)
for B, H, K, S, D in [(1, 8, 2, 100, 64), (3, 4, 4, 300, 64), (2, 16, 2, 1000, 128), (1, 8, 8, 64, 64)]:
    q = torch.randn(B, 1, H, D).transpose(1, 2)  # strided, as the model's q
    k, v = (torch.randn(B + 1, K, S, D)[:B] for _ in range(2))  # the first B rows of a larger cache
    position = torch.randint(0, S, (B, 1))
    position[0, 0] = S - 1
    mask = (torch.arange(S) <= position[:, :, None]).unsqueeze(1)
    out = decode_attention(q, k, v, position)
    ref = reference_attention(q.double(), k.double(), v.double(), mask)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error < 1e-5, (B, H, K, S, D, error)
gate_up = torch.randn(2, 3, 2 * 700)
assert torch.allclose(silu_mul(gate_up), reference_silu_mul(gate_up), rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_match_the_model_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
