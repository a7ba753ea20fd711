"""Meta's original layout: params.json + consolidated.NN.pth, interleaved rotary pairs, model-parallel shards.

The test writes the Meta checkpoint from a transformers model by undoing transformers' conversion
(convert_llama_weights_to_hf.py): q/k rows go back to interleaved pairs, and each tensor is split the way
fairscale's parallel layers split it. Loading it must give transformers' logits again.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import official_config, reference_logits, relative_error, shrink, write_hf_checkpoint

import llama


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rotate-half rows -> Meta interleaved rows: row 2j <- row j, row 2j+1 <- row j + D/2."""
    rows, C = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, C).transpose(1, 2).reshape(rows, C)


def write_meta_checkpoint(folder, hf_model, n_shards: int, embedding_split_dim: int, params: dict):
    config = hf_model.config
    H, K = config.num_attention_heads, config.num_key_value_heads
    sd = hf_model.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(8)}  # Llama 2 saved its rope table
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        meta |= {
            f"layers.{i}.attention.wq.weight": to_interleaved(sd[p + "self_attn.q_proj.weight"], H),
            f"layers.{i}.attention.wk.weight": to_interleaved(sd[p + "self_attn.k_proj.weight"], K),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    shards = [{} for _ in range(n_shards)]
    for name, tensor in meta.items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
            pieces = tensor.chunk(n_shards, dim=0)  # column-parallel
        elif name.endswith(("wo.weight", "w2.weight")):
            pieces = tensor.chunk(n_shards, dim=1)  # row-parallel
        elif name == "tok_embeddings.weight":
            pieces = tensor.chunk(n_shards, dim=embedding_split_dim)
        else:
            pieces = [tensor] * n_shards  # replicated
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    folder.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))


def meta_params(hf: dict, **extra) -> dict:
    return {"dim": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
            "n_kv_heads": hf["num_key_value_heads"], "norm_eps": hf["rms_norm_eps"], "multiple_of": 16, **extra}


@pytest.mark.parametrize("family,split_dim", [("llama-2-70b", 1), ("llama-3-8b", 0)],
                         ids=["llama2-embeddings-split-on-width", "llama3-embeddings-split-on-vocab"])
def test_two_shard_meta_checkpoint_matches_transformers(tmp_path, family, split_dim):
    hf = shrink(official_config(family), hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=176)
    hf.pop("head_dim")  # Meta's layout always has head_dim = dim / n_heads
    # 2/3 * 4 * 64 = 170 -> rounded up to a multiple of 16 = 176, the intermediate_size above
    theta = hf.get("rope_theta", 10_000.0)
    params = meta_params(hf, vocab_size=-1 if family.startswith("llama-2") else hf["vocab_size"], rope_theta=theta)
    model = write_hf_checkpoint(tmp_path / "hf", hf)
    write_meta_checkpoint(tmp_path / "meta", model, n_shards=2, embedding_split_dim=split_dim, params=params)

    llm = llama.Llama.from_pretrained(tmp_path / "meta", device="cpu", progress=False)
    assert llm.config.vocab_size == hf["vocab_size"] and llm.config.ffn_dim == 176
    tokens = torch.randint(0, hf["vocab_size"], (2, 40))
    assert relative_error(llm.logits(tokens), reference_logits(model, tokens)) < 1e-4


def test_meta_checkpoint_with_scaled_rope_in_original_subfolder(tmp_path):
    """The hub's meta-llama repos keep Meta's files in original/; use_scaled_rope means the Llama 3.1 rule."""
    hf = shrink(official_config("llama-3.1-8b"), hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=176, max_position_embeddings=256)
    hf.pop("head_dim")
    model = write_hf_checkpoint(tmp_path / "hf", hf)
    params = meta_params(hf, vocab_size=hf["vocab_size"], rope_theta=500000.0, use_scaled_rope=True)
    write_meta_checkpoint(tmp_path / "repo" / "original", model, n_shards=1, embedding_split_dim=0, params=params)
    llm = llama.Llama.from_pretrained(tmp_path / "repo", device="cpu", progress=False)
    assert llm.config.rope.type == "llama3" and llm.config.rope.factor == 8.0
    # The official rule has original context 8192 > these 200 positions, so compare to transformers with it.
    tokens = torch.randint(0, hf["vocab_size"], (1, 200))
    assert relative_error(llm.logits(tokens), reference_logits(model, tokens)) < 1e-4


def test_permutation_uses_kv_heads_for_keys(tmp_path):
    """With GQA, permuting k with the query head count scrambles k; the logits check above would catch it,
    and this pins the reason: the Meta->HF row order of k is per kv head."""
    from llama.weights import permute_meta_rotary

    w = torch.arange(2 * 8)[:, None].float()  # 2 kv heads of D = 8: rows 0..15
    permuted = permute_meta_rotary(w, n_heads=2)[:, 0].long().tolist()
    assert permuted == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
