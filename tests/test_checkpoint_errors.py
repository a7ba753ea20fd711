"""A broken checkpoint is an error that names the problem: the file, the shard, the tensor and its shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import official_config, shrink, write_hf_checkpoint
from safetensors.torch import load_file, save_file

import llama
from llama import CheckpointError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(folder, shrink(official_config("llama-3-8b")))
    return folder


@pytest.fixture
def copy(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def load(folder):
    return llama.Llama.from_pretrained(folder, device="cpu", progress=False)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load(tmp_path / "nope")


def test_truncated_file_names_the_file(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load(copy)


def test_corrupt_header_names_the_file(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load(copy)


def test_missing_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.1\.mlp\.up_proj\.weight"):
        load(copy)


def test_unknown_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.0\.attention\.q_norm\.weight'"):
        load(copy)


def test_wrong_shape_names_tensor_and_both_shapes(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 128)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(48, 128\).*expects \(32, 128\)"):
        load(copy)


def test_shard_missing_from_index_is_named(tmp_path):
    write_hf_checkpoint(tmp_path, shrink(official_config("llama-3-8b")), max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim} is listed in the index but missing"):
        load(tmp_path)


def test_missing_meta_shard_is_named(tmp_path):
    for rank in (0, 2):
        torch.save({}, tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
        load(tmp_path)


def test_corrupt_meta_shard_names_the_file(tmp_path):
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: corrupt"):
        load(tmp_path)


def test_old_rotary_inv_freq_buffers_are_ignored(copy, checkpoint):
    """transformers < 4.31 saved each layer's rotary table; it is recomputed, not loaded."""
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, copy / "model.safetensors")
    tokens = torch.randint(0, 320, (1, 12))
    torch.testing.assert_close(load(copy).logits(tokens), load(checkpoint).logits(tokens), rtol=0, atol=0)


def test_weights_that_do_not_fit_on_the_device_are_explained(checkpoint, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.nn.Module, "to_empty", out_of_memory)
    with pytest.raises(MemoryError, match=r"the weights need .* GiB in torch.float32 and do not fit"):
        load(checkpoint)
