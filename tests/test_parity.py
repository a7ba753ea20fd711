"""Logits equal transformers' LlamaForCausalLM for a tiny version of every official family and every option.

Tolerance: float32 on CPU; the two implementations order a few reductions differently, which moves logits by
~1e-6 relative. 1e-4 catches any real difference (a wrong rotation, frequency or norm shows up at 1e-2 or more).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import official_config, reference_logits, relative_error, shrink, write_hf_checkpoint

import llama

TOLERANCE = 1e-4
FAMILIES = [
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "codellama-7b", "codellama-34b", "llama-3-8b", "llama-3-70b",
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
]


def assert_same_logits(folder, reference, seq_len=48, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, reference.config.vocab_size, (batch, seq_len), generator=generator)
    ours = llama.Llama.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False).logits(tokens)
    theirs = reference_logits(reference, tokens)
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_every_official_family_matches_transformers(tmp_path, family):
    config = shrink(official_config(family))
    if config.get("rope_scaling"):  # shrink the pre-training length so 48 tokens cross the llama3 blend band
        config["rope_scaling"] = dict(config["rope_scaling"], original_max_position_embeddings=32)
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference)


def test_llama3_scaling_past_the_original_context(tmp_path):
    # head_dim 16, theta 500,000, L0 = 64: wavelengths 6.3 (kept), 33 (blended), 174+ (divided by 8);
    # 160 positions run well past L0, where the scaled frequencies decide the attention pattern.
    config = shrink(official_config("llama-3.1-8b"), max_position_embeddings=512)
    config["rope_scaling"] = dict(config["rope_scaling"], original_max_position_embeddings=64)
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference, seq_len=160)


ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # 96 tokens > max_position_embeddings 64: base grows
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_each_rope_type_matches_transformers(tmp_path, variant):
    config = shrink(official_config("llama-2-7b"), rope_theta=10_000.0, max_position_embeddings=64,
                    rope_scaling=ROPE_VARIANTS[variant])
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference, seq_len=96)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
def test_head_layouts_match_transformers(tmp_path, heads, kv_heads):
    config = shrink(official_config("llama-3-8b"), num_attention_heads=heads, num_key_value_heads=kv_heads)
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference)


def test_head_dim_independent_of_width(tmp_path):
    config = shrink(official_config("llama-3.2-1b"), hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32)  # 4 * 32 = 128 != 48
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference)


def test_attention_and_mlp_biases_match_transformers(tmp_path):
    config = shrink(official_config("llama-2-7b"), attention_bias=True, mlp_bias=True)
    reference = write_hf_checkpoint(tmp_path, config)
    assert_same_logits(tmp_path, reference)


def test_tied_embeddings_load_without_lm_head(tmp_path):
    config = shrink(official_config("llama-3.2-1b"))
    reference = write_hf_checkpoint(tmp_path, config)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    llm = llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False)
    assert llm.model.lm_head.weight is llm.model.embed_tokens.weight
    assert_same_logits(tmp_path, reference)


def test_sharded_safetensors_match_transformers(tmp_path):
    config = shrink(official_config("llama-3.1-8b"))
    reference = write_hf_checkpoint(tmp_path, config, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_logits(tmp_path, reference)


def test_both_config_spellings_give_the_same_model(tmp_path):
    """transformers 4.x: rope_theta + rope_scaling with key "type"; 5.x: rope_parameters with "rope_type"."""
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    v4 = shrink(official_config("llama-3.1-8b"), rope_theta=500_000.0, rope_scaling=dict(scaling, type="llama3"))
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(scaling, rope_type="llama3", rope_theta=500_000.0)
    reference = write_hf_checkpoint(tmp_path / "v4", v4)
    write_hf_checkpoint(tmp_path / "v5", v5)
    assert llama.ModelConfig.from_file(tmp_path / "v4/config.json") == llama.ModelConfig.from_file(
        tmp_path / "v5/config.json")
    assert_same_logits(tmp_path / "v4", reference)
    assert_same_logits(tmp_path / "v5", reference)


def test_sdpa_and_reference_attention_agree(tmp_path):
    config = shrink(official_config("llama-3-8b"))
    write_hf_checkpoint(tmp_path, config)
    llm = llama.Llama.from_pretrained(tmp_path, device="cpu", progress=False)
    tokens = torch.randint(0, 320, (2, 40))
    fused = llm.logits(tokens)
    llm.model.set_attention("reference")
    assert relative_error(llm.logits(tokens), fused) < 1e-5
