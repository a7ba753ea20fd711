"""Tensor parallelism on CPU: 2 processes over gloo, as torchrun would start them.

Each rank must hold about half of the layer weights, and the split model must give the single-process logits
(and transformers'), and the same greedy and sampled tokens on every rank.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import official_config, reference_logits, relative_error, shrink, write_hf_checkpoint

import llama
from llama.cli import main
from llama.config import ConfigError, ModelConfig
from llama.tp import TensorParallel, shutdown

PROMPTS = [[5, 9, 33, 7], [7, 8, 100, 101, 102, 103, 104, 3, 11], [250]]
TOKENS = [[5, 9, 33, 7, 1, 2, 3, 4, 200, 201, 17, 19], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, out: str, quantize: str | None = None,
            group_size: int | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.manual_seed(1000 + rank)  # the ranks' own random streams differ: the engine must share one
    llm = llama.Llama.from_pretrained(folder, device="cpu", progress=False, quantize=quantize,
                                      group_size=group_size)
    result = {
        "logits": llm.logits(torch.tensor(TOKENS)),
        "greedy": [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=10)],
        "sampled": [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=10, temperature=1.0)],
        "layer_numel": sum(p.numel() for n, p in llm.model.named_parameters() if n.startswith("layers.")),
    }
    shutdown()  # what the CLI (and, at exit, the engine) does: leave the group the engine joined
    result["left_group"] = not dist.is_initialized()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def run_two_ranks(folder, tmp_path, quantize=None, group_size=None):
    mp.spawn(_worker, args=(2, free_port(), str(folder), str(tmp_path), quantize, group_size), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    model = write_hf_checkpoint(folder, shrink(official_config("llama-3.1-8b"), attention_bias=True, mlp_bias=True),
                                max_shard_size="200KB")
    return folder, model


def test_two_ranks_equal_one_process_and_transformers(checkpoint, tmp_path):
    folder, reference = checkpoint
    ranks = run_two_ranks(folder, tmp_path)
    single = llama.Llama.from_pretrained(folder, device="cpu", progress=False)
    for result in ranks:
        # float32; the all-reduce sums two partial products, which reorders a few additions
        assert relative_error(result["logits"], single.logits(torch.tensor(TOKENS))) < 1e-5
        assert relative_error(result["logits"], reference_logits(reference, torch.tensor(TOKENS))) < 1e-4
        assert result["greedy"] == [r.token_ids for r in single.generate(PROMPTS, max_new_tokens=10)]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert all(result["left_group"] for result in ranks)


def test_each_rank_holds_about_half_of_the_layer_weights(checkpoint, tmp_path):
    folder, _ = checkpoint
    ranks = run_two_ranks(folder, tmp_path)
    whole = sum(p.numel() for n, p in llama.Llama.from_pretrained(folder, device="cpu", progress=False)
                .model.named_parameters() if n.startswith("layers."))
    for result in ranks:
        # everything but the norms (and o/down biases) is split; those are replicated and tiny
        assert 0.5 <= result["layer_numel"] / whole < 0.52


def test_meta_checkpoint_splits_too(tmp_path):
    from test_meta import meta_params, write_meta_checkpoint

    hf = shrink(official_config("llama-3-8b"), hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=176)
    hf.pop("head_dim")
    model = write_hf_checkpoint(tmp_path / "hf", hf)
    write_meta_checkpoint(tmp_path / "meta", model, n_shards=2, embedding_split_dim=0,
                          params=meta_params(hf, vocab_size=hf["vocab_size"], rope_theta=500000.0))
    (tmp_path / "out").mkdir()
    ranks = run_two_ranks(tmp_path / "meta", tmp_path / "out")
    for result in ranks:
        assert relative_error(result["logits"], reference_logits(model, torch.tensor(TOKENS))) < 1e-4


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_a_quantized_model_splits_over_two_ranks_like_a_dense_one(tmp_path, mode, group):
    # Widths of which each rank holds whole groups (o_proj 64 and down_proj 128 input features per rank), so each
    # rank quantizes the rows and groups one process would; quantized on load, and from a saved checkpoint.
    write_hf_checkpoint(tmp_path / "dense", shrink(official_config("llama-3.1-8b"), intermediate_size=256))
    single = llama.Llama.from_pretrained(tmp_path / "dense", device="cpu", progress=False, quantize=mode,
                                         group_size=group)
    assert main(["quantize", "--model", str(tmp_path / "dense"), "--quantize", mode, "--out",
                 str(tmp_path / "saved"), "--device", "cpu"] + (["--group-size", str(group)] if group else [])) == 0
    dense = llama.Llama.from_pretrained(tmp_path / "dense", device="cpu", progress=False).logits(TOKENS)
    for folder, arguments in ((tmp_path / "dense", (mode, group)), (tmp_path / "saved", (None, None))):
        out = tmp_path / f"out-{folder.name}"
        out.mkdir()
        ranks = run_two_ranks(folder, out, *arguments)
        assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
        if mode == "int8" and folder.name == "dense":
            # int8 quantized on load: each rank scales its half of an o/down row by that half's own maximum, a
            # (slightly finer) quantization of its own; it must be as close to the dense model as one process's
            error = relative_error(single.logits(TOKENS), dense)
            assert relative_error(ranks[0]["logits"], dense) < 1.5 * error
            continue
        assert relative_error(ranks[0]["logits"], single.logits(TOKENS)) < 1e-5
        assert ranks[0]["greedy"] == [r.token_ids for r in single.generate(PROMPTS, max_new_tokens=10)]


def test_kv_heads_not_divisible_by_the_ranks_is_a_clear_error():
    config = dataclasses.replace(ModelConfig.from_file("configs/llama-3-8b.json"), n_kv_heads=3, n_heads=24)
    with pytest.raises(ConfigError, match="num_key_value_heads=3 is not divisible by the 2 tensor-parallel ranks"):
        TensorParallel(rank=0, world_size=2).local_config(config)


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "llama", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))


def test_cli_under_torchrun_prints_once_what_one_process_prints(smollm2_dir, tmp_path):
    config = shrink(official_config("llama-3-8b"), vocab_size=49152, bos_token_id=1, eos_token_id=2)
    write_hf_checkpoint(tmp_path, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    args = ["generate", "--model", str(tmp_path), "--prompt", "The capital of France is", "--max-new-tokens", "6",
            "--device", "cpu", "--no-compile"]  # (one process on a CPU would compile by default; torchrun does not)
    parallel = torchrun(*args)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "llama", *args], capture_output=True, text=True, timeout=300)
    assert parallel.stdout == single.stdout and parallel.stdout.strip()


def test_cli_under_torchrun_explains_indivisible_kv_heads(smollm2_dir):
    result = torchrun("generate", "--model", str(smollm2_dir), "--prompt", "hi", "--device", "cpu")
    assert result.returncode != 0
    assert "num_key_value_heads=3 is not divisible by the 2 tensor-parallel ranks" in result.stderr
