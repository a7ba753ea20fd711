"""Tiny random-weight checkpoints written by transformers itself, the independent reference for every test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def shrink(official: dict, **changes) -> dict:
    """An official config.json at test size: same rope settings, same head layout (MHA / GQA ratio / MQA) and
    same tying, with small widths (head_dim 16, width 16 x heads, 2 layers, vocab 320)."""
    heads, kv = official["num_attention_heads"], official.get("num_key_value_heads", official["num_attention_heads"])
    group = heads // kv
    small_kv = 4 if group == 1 else 2
    config = dict(official)
    config.update(
        num_attention_heads=small_kv * group, num_key_value_heads=small_kv, head_dim=16,
        hidden_size=16 * small_kv * group, intermediate_size=176, num_hidden_layers=2, vocab_size=320,
        bos_token_id=1, eos_token_id=2, initializer_range=0.15,
    )
    config.update(changes)
    return config


def official_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def write_hf_checkpoint(folder: Path, config: dict, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    """Build transformers' LlamaForCausalLM from a config.json dict, save it, and return it (eval, float32).
    The config.json on disk is the dict given, byte for byte, so the engine reads the spelling under test."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make them matter too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(folder, **save_kwargs)
    (folder / "config.json").write_text(json.dumps(config))
    return model


def reference_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|: one number that is small only if every logit agrees."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# ---------------------------------------------------------------------------- the real SmolLM2 weights
@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from llama.demo_model import find_smollm2_gguf

    return find_smollm2_gguf()  # installed by `make install`; a missing package fails the tests loudly


@pytest.fixture(scope="session")
def smollm2_dir(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model converted once per test session into a fresh folder."""
    from llama.demo_model import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("cache") / "smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2_reference(gguf_path: Path) -> torch.nn.Module:
    """transformers' own reading of the GGUF file: the independent reference for the real-weight tests."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    return model.eval()
