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


def ragged_decode_logits(model, lengths: list[int], steps: int, cache_len: int, span: bool,
                         never_used: float = 0.0) -> torch.Tensor:
    """Prefill right-padded prompts of `lengths`, then decode `steps` tokens per row, each row at its own
    position; the logits of every decode step [steps, B, V]. With `span`, each step is told the slots in use
    (as the generation loop tells it), else it reads the whole cache. The cache slots that no step uses
    (from max(lengths) + steps on) hold `never_used`."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 320, (len(lengths), max(lengths) + steps))
    model.setup_cache(max_batch_size=len(lengths), max_seq_len=cache_len)
    for layer in model.layers:
        layer.attention.cache.k[:, :, max(lengths) + steps:] = never_used
        layer.attention.cache.v[:, :, max(lengths) + steps:] = never_used
    position = torch.tensor(lengths)[:, None]  # [B, 1]
    with torch.no_grad():
        model(tokens[:, :max(lengths)], input_pos=torch.arange(max(lengths)))
        logits = []
        for step in range(steps):
            token = tokens.gather(1, position)  # [B, 1]
            in_use = max(lengths) + step + 1
            logits.append(model(token, input_pos=position, span=in_use if span else None)[:, -1].float())
            position = position + 1
    model.clear_cache()
    return torch.stack(logits)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_decode_with_a_long_cache_equals_a_cache_of_the_needed_length(checkpoint, attention):
    """Rows at different positions, a cache 40x longer than needed, read up to the slots in use only: the same
    logits as a cache of exactly the needed length read whole."""
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)
    llm.model.set_attention(attention)
    lengths, steps = [5, 17, 11], 8
    needed = ragged_decode_logits(llm.model, lengths, steps, cache_len=max(lengths) + steps, span=False)
    long = ragged_decode_logits(llm.model, lengths, steps, cache_len=1000, span=True)
    # float32; the masked slots add exact zeros, so only the order of the sums can differ
    assert relative_error(long, needed) < 1e-6


@pytest.mark.parametrize("lengths", [[5, 17, 11], [9]], ids=["ragged batch", "one row"])
def test_compiled_cpu_decode_with_a_long_cache_equals_eager_with_the_needed_length(checkpoint, lengths):
    """compile=True on a CPU: the decode step calls its layers and output projection compiled for one token, each
    reading the slots in use of a long cache; the logits of eager steps over a cache of the needed length. (One
    row: the one-row products are compiled as sums, `model.Linear`.)"""
    eager = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)
    compiled = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False, compile=True)
    steps = 8
    needed = ragged_decode_logits(eager.model, lengths, steps, cache_len=max(lengths) + steps, span=False)
    long = ragged_decode_logits(compiled.model, lengths, steps, cache_len=1000, span=True)
    # float32; compiled, a one-row product sums in another order than torch's matmul (model.Linear)
    assert relative_error(long, needed) < 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_decode_reads_no_cache_slot_past_the_span(checkpoint, attention):
    """The slots past every step's span hold NaN, which a step that read them would turn into NaN logits
    (0 * NaN = NaN under the mask); the logits are those of a clean cache, bit for bit."""
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)
    llm.model.set_attention(attention)
    lengths, steps = [5, 17, 11], 8
    clean = ragged_decode_logits(llm.model, lengths, steps, cache_len=64, span=True)
    poisoned = ragged_decode_logits(llm.model, lengths, steps, cache_len=64, span=True, never_used=float("nan"))
    assert torch.equal(poisoned, clean)
    assert ragged_decode_logits(llm.model, lengths, steps, cache_len=64, span=False,
                                never_used=float("nan")).isnan().all()  # (reading the whole cache does)


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


def test_the_cache_grows_in_powers_of_two_up_to_max_seq_len(checkpoint):
    """Calls that need more positions than the cache holds (a chat's growing history) reallocate it rounded up to
    a power of two (at least 256), never beyond max_seq_len; calls that fit keep it."""
    llm = llama.Llama.from_pretrained(checkpoint[0], device="cpu", max_seq_len=1000, progress=False)
    allocated = []
    for prompt_len, new_tokens in [(10, 20), (200, 100), (100, 20), (600, 10), (900, 50)]:
        llm.generate([[3 + t % 300 for t in range(prompt_len)]], max_new_tokens=new_tokens, stop_token_ids=[])
        allocated.append(llm.model.layers[0].attention.cache.k.shape[2])
    assert allocated == [256, 512, 512, 1000, 1000]


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
