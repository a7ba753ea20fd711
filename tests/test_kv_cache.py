"""The static KV cache: a prefill followed by one token at a time computes what one full forward computes."""

from __future__ import annotations

import pytest
import torch
from conftest import official_config, relative_error, shrink, write_hf_checkpoint

import llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    config = shrink(official_config("llama-3.1-8b"))
    config["rope_scaling"] = dict(config["rope_scaling"], original_max_position_embeddings=16)
    return folder, write_hf_checkpoint(folder, config)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_prefill_then_decode_equals_full_forward(checkpoint, attention):
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)
    llm.model.set_attention(attention)
    tokens = torch.randint(0, 320, (3, 40))
    full = llm.logits(tokens)  # [B, T, V]

    model, prefill = llm.model, 24
    model.setup_cache(max_batch_size=4, max_seq_len=64)
    with torch.no_grad():
        steps = [model(tokens[:, :prefill], input_pos=torch.arange(prefill)).float()]
        for t in range(prefill, 40):
            steps.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t])).float())
    cached = torch.cat(steps, dim=1)
    # float32; the cached path attends over the 64-slot cache with a mask instead of the causal kernel
    assert relative_error(cached, full) < 1e-5


def test_rows_at_different_positions_decode_independently(checkpoint):
    """Right-padded prefill and per-row positions: each row's logits equal that row run alone."""
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)
    lengths = [5, 17, 11]
    seqs = [torch.randint(0, 320, (n + 1,)) for n in lengths]  # prompt + one decoded token
    model = llm.model
    model.setup_cache(max_batch_size=3, max_seq_len=32)
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, (n, seq) in enumerate(zip(lengths, seqs)):
        padded[row, :n] = seq[:n]
    with torch.no_grad():
        last = model(padded, input_pos=torch.arange(max(lengths)), logits_at=torch.tensor(lengths) - 1).float()
        step = model(torch.stack([s[-1] for s in seqs])[:, None], input_pos=torch.tensor(lengths)[:, None]).float()
    model.clear_cache()
    for row, seq in enumerate(seqs):
        alone = llm.logits(seq[None])[0]  # [n + 1, V]
        assert relative_error(last[row], alone[-2]) < 1e-5
        assert relative_error(step[row, 0], alone[-1]) < 1e-5


def test_greedy_batch_equals_transformers_generate_per_prompt(checkpoint):
    folder, reference = checkpoint
    llm = llama.Llama.from_pretrained(folder, device="cpu", progress=False)
    prompts = [[5, 9, 33], [7, 8, 100, 101, 102, 103, 104, 3], [250]]
    results = llm.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    for prompt, result in zip(prompts, results):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        if 2 in expected:  # the engine stops at eos (token 2) and does not return it
            assert result.finish_reason == "stop"
            expected = expected[: expected.index(2)]
        else:
            assert result.finish_reason == "length"
        assert result.token_ids == expected


def test_prompt_longer_than_context_is_a_clear_error(checkpoint):
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", max_seq_len=32, progress=False)
    with pytest.raises(ValueError, match="more than max_seq_len=32"):
        llm.generate([list(range(30))], max_new_tokens=5)


def test_running_out_of_device_memory_is_explained(checkpoint, monkeypatch):
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(llm.model, "forward", out_of_memory)
    with pytest.raises(MemoryError, match="out of device memory generating for 2 prompt"):
        llm.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
