"""Config reading: both Hugging Face spellings, Meta's params.json, and clear errors for what cannot be honoured."""

from __future__ import annotations

import json

import pytest

from llama.config import ConfigError, ModelConfig, meta_ffn_dim


def official(name):
    return ModelConfig.from_file(f"configs/{name}.json")


@pytest.mark.parametrize("name,params", [
    ("llama-2-7b", {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}),
    ("llama-2-70b", {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}),
    ("llama-3-8b", {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}),
    ("llama-3.1-8b", {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                      "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 128256}),
    ("llama-3.1-405b", {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128256,
                        "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
                        "use_scaled_rope": True}),
    ("llama-3.2-1b", {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}),
])
def test_meta_params_give_the_official_hf_shapes(name, params):
    """Meta's params.json (as published) and the hub's config.json describe the same network."""
    hf = official(name)
    meta = ModelConfig.from_meta_params(params, vocab_size=hf.vocab_size)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps"):
        assert getattr(meta, field) == getattr(hf, field), field
    assert meta.rope.type == hf.rope.type and meta.rope.theta == hf.rope.theta
    assert meta.rope.factor == hf.rope.factor


def test_meta_ffn_rule():
    assert meta_ffn_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_ffn_dim(5120, 256, None) == 13824  # Llama 2 13B
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672  # Llama 2/3 70B


def test_llama2_vocab_minus_one_needs_the_tensor():
    with pytest.raises(ConfigError, match="vocab_size is -1"):
        ModelConfig.from_meta_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1})


def test_llama31_rope_reads_all_four_settings():
    rope = official("llama-3.1-8b").rope
    assert (rope.type, rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
            rope.original_max_position_embeddings) == ("llama3", 500_000.0, 8.0, 1.0, 4.0, 8192)
    assert official("llama-3.2-3b").rope.factor == 32.0 and official("llama-3.2-3b").tie_word_embeddings
    assert official("codellama-7b").rope.theta == 1_000_000.0


def test_null_rope_scaling_is_default_rope():
    data = json.loads(open("configs/llama-2-7b.json").read())
    assert data["rope_scaling"] is None
    assert ModelConfig.from_hf_config(data).rope.type == "default"


def write(tmp_path, **changes):
    data = json.loads(open("configs/llama-3-8b.json").read())
    data.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v != "DROP"}))
    return path


def test_unknown_rope_type_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rope_scaling.rope_type 'longrope'"):
        ModelConfig.from_file(write(tmp_path, rope_scaling={"rope_type": "longrope", "factor": 2.0}))


def test_unknown_rope_setting_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="low_freq_factor"):
        ModelConfig.from_file(write(tmp_path, rope_scaling={"type": "linear", "factor": 2.0, "low_freq_factor": 1}))


def test_missing_rope_setting_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="high_freq_factor"):
        ModelConfig.from_file(write(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0}))


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'intermediate_size' is missing"):
        ModelConfig.from_file(write(tmp_path, intermediate_size="DROP"))


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("quantization_config", {"bits": 4}),
                                       ("model_type", "mistral"), ("partial_rotary_factor", 0.5)])
def test_settings_the_engine_cannot_honour_are_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_file(write(tmp_path, **{key: value}))


def test_unknown_keys_are_reported_not_dropped_silently(tmp_path):
    with pytest.warns(UserWarning, match="frobnication_level"):
        ModelConfig.from_file(write(tmp_path, frobnication_level=3))


def test_kv_heads_must_divide_heads(tmp_path):
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_file(write(tmp_path, num_key_value_heads=5))


def test_eos_list_is_kept(tmp_path):
    config = ModelConfig.from_file(write(tmp_path, eos_token_id=[128001, 128008, 128009]))
    assert config.eos_token_ids == (128001, 128008, 128009)
