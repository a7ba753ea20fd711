"""RoPE: frequencies against transformers' own initialisers, the Llama 3.1 bands, and the geometry of rotation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import official_config, shrink
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama.config import ModelConfig, RopeConfig
from llama.model import RotaryEmbedding, apply_rope, rope_inv_freq
from llama.weights import permute_meta_rotary

VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                    "mscale_all_dim": 0.8, "beta_fast": 24.0, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


def configs(variant, tmp_path):
    hf = shrink(official_config("llama-3-8b"), head_dim=128, hidden_size=1024, num_attention_heads=8,
                max_position_embeddings=131072, rope_scaling=VARIANTS[variant])
    (tmp_path / "config.json").write_text(__import__("json").dumps(hf))
    return ModelConfig.from_file(tmp_path / "config.json"), AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inverse_frequencies_equal_transformers(tmp_path, variant):
    ours_config, hf_config = configs(variant, tmp_path)
    ours, our_scale = rope_inv_freq(ours_config)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[VARIANTS[variant]["rope_type"]](hf_config, "cpu")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(their_scale, rel=1e-12)


def test_dynamic_base_grows_with_the_sequence_like_transformers(tmp_path):
    ours_config, hf_config = configs("dynamic", tmp_path)
    for seq_len in (1000, 131072, 300_000):
        ours, _ = rope_inv_freq(ours_config, seq_len=torch.tensor(seq_len))
        theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu", seq_len=seq_len)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_default_frequencies_follow_the_formula():
    config = ModelConfig.from_file("configs/llama-2-7b.json")
    inv_freq, _ = rope_inv_freq(config)
    expected = torch.tensor([10_000 ** (-2 * i / 128) for i in range(64)], dtype=torch.float64)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_llama31_bands_for_head_dim_128():
    """ANCHORS.md: with head_dim 128, indices 0-28 keep their frequency, 29-34 blend, 35-63 are divided by 8."""
    config = ModelConfig.from_file("configs/llama-3.1-8b.json")
    scaled, _ = rope_inv_freq(config)
    plain = 500_000.0 ** (-torch.arange(0, 128, 2).double() / 128)
    ratio = plain / scaled.double()
    assert torch.allclose(ratio[:29], torch.ones(29, dtype=torch.float64), rtol=1e-6)
    assert torch.all((ratio[29:35] > 1 + 1e-3) & (ratio[29:35] < 8 - 1e-3))
    assert torch.allclose(ratio[35:], torch.full((29,), 8.0, dtype=torch.float64), rtol=1e-6)


def test_llama32_divides_low_frequencies_by_32():
    scaled, _ = rope_inv_freq(ModelConfig.from_file("configs/llama-3.2-1b.json"))
    plain = 500_000.0 ** (-torch.arange(0, 64, 2).double() / 64)
    assert (plain[-1] / scaled[-1].double()).item() == pytest.approx(32.0, rel=1e-6)


def rotate(x: torch.Tensor, position: float, base: float) -> torch.Tensor:
    """Rotate one vector in Meta's interleaved layout by going through the engine's rotate-half layout:
    the same permutation the Meta loader applies to q/k weight rows, applied to a single "row" vector."""
    D = x.shape[-1]
    config = ModelConfig(vocab_size=1, dim=D, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=D, ffn_dim=1,
                         rope=RopeConfig(theta=base))
    rope = RotaryEmbedding(config).double()
    rope.inv_freq = rope.inv_freq.double()
    half_layout = permute_meta_rotary(x.double()[:, None], n_heads=1)[:, 0]
    angles = torch.tensor([[position]], dtype=torch.float64) * rope.inv_freq
    angles = torch.cat((angles, angles), -1)  # [1, 1, D] as in RotaryEmbedding.forward
    rotated = apply_rope(half_layout.view(1, 1, 1, D), angles.cos(), angles.sin()).view(D)
    inverse = torch.empty(D, dtype=torch.long)
    inverse[permute_meta_rotary(torch.arange(D)[:, None], 1)[:, 0]] = torch.arange(D)
    return rotated[inverse]


def test_worked_example_d2():
    q = rotate(torch.tensor([3.0, 4.0]), position=1.0, base=100.0)
    expected = torch.tensor([3 * math.cos(1) - 4 * math.sin(1), 3 * math.sin(1) + 4 * math.cos(1)])
    torch.testing.assert_close(q, expected.double())


def test_worked_example_relative_position_d2():
    q, k = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    first = rotate(q, math.pi / 2, 100.0) @ rotate(k, math.pi, 100.0)
    second = rotate(q, 0.0, 100.0) @ rotate(k, math.pi / 2, 100.0)  # same m - n
    assert first.item() == pytest.approx(-2.0)
    assert second.item() == pytest.approx(-2.0)


def test_worked_example_d4():
    q = rotate(torch.tensor([1.0, 1.0, 2.0, 0.0]), math.pi, base=4.0)  # theta = (1, 1/2)
    torch.testing.assert_close(q, torch.tensor([-1.0, -1.0, 0.0, 2.0], dtype=torch.float64))
    k = rotate(torch.tensor([1.0, 0.0, 0.0, 1.0]), 0.0, base=4.0)
    assert (q @ k).item() == pytest.approx(1.0)


def test_rotation_preserves_norms_and_depends_only_on_distance():
    config = ModelConfig.from_file("configs/llama-3.1-8b.json")
    rope = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 1, 128, dtype=torch.float64), torch.randn(1, 1, 1, 128, dtype=torch.float64)

    def at(x, m):
        cos, sin = rope(torch.tensor([[m]]), torch.float64)
        return apply_rope(x, cos, sin)

    for m in (0, 7, 5000, 100_000):
        torch.testing.assert_close(at(q, m).norm(), q.norm())
    # Angles are float32 (as in transformers): at position m they carry ~m * 6e-8 rad of rounding, so the dot
    # products agree to ~1e-4 at m = 8000.
    dots = [(at(q, m) * at(k, m - 37)).sum() for m in (37, 1000, 8000)]
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dots[0], dots[2], rtol=1e-3, atol=1e-3)
    shifted = (at(q, 1000) * at(k, 1000 - 38)).sum()  # a different distance gives a different score
    assert (shifted - dots[0]).abs() > 1e-2
