"""The Python API's arguments: a wrong type or value is a ValueError naming the argument, raised before any work.

The valid ranges are the ones transformers documents for the same sampling options (temperature >= 0, top_k >= 1,
top_p in (0, 1], min_p in [0, 1], repetition_penalty > 0); the model is the SmolLM2 demo, loaded once."""

from __future__ import annotations

import shutil

import pytest
import torch

import llama
import llama.api

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def greedy(llm):
    """The greedy answer to PROMPT without any stop: the reference the stop tests cut."""
    return llm.generate(PROMPT, max_new_tokens=24)[0]


# ---------------------------------------------------------------------------- stop strings
def test_one_stop_string_may_be_a_str(llm, greedy):
    """stop="..." is that one string (not its characters): the text ends just before its first occurrence."""
    full = greedy.text
    stop = full.strip().split()[1]  # a word from the middle of the greedy answer, two or more characters long
    assert len(stop) > 1
    result = llm.generate(PROMPT, max_new_tokens=24, stop=stop)[0]
    assert result.text == full[:full.index(stop)] and result.finish_reason == "stop"


def test_stream_takes_one_stop_string_too(llm, greedy):
    full = greedy.text
    stop = full.strip().split()[1]
    assert "".join(llm.stream(PROMPT, max_new_tokens=24, stop=stop)) == full[:full.index(stop)]


@pytest.mark.parametrize("stop", ["", [""], ["Paris", ""]])
def test_empty_stop_string_is_refused(llm, stop):
    with pytest.raises(ValueError, match="stop must not be an empty string"):
        llm.generate(PROMPT, max_new_tokens=4, stop=stop)


@pytest.mark.parametrize("stop", [5, ["Paris", 1], [b"Paris"]])
def test_stop_that_is_not_text_is_refused(llm, stop):
    with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
        llm.generate(PROMPT, max_new_tokens=4, stop=stop)


# ---------------------------------------------------------------------------- types and ranges of generate / stream
BAD_OPTIONS = [
    # wrong types
    ("max_new_tokens", "10"), ("max_new_tokens", 10.0), ("max_new_tokens", True), ("seed", "abc"), ("seed", 1.5),
    ("temperature", "hot"), ("temperature", None), ("top_k", 2.5), ("top_k", True), ("top_p", "0.9"),
    ("min_p", [0.1]), ("repetition_penalty", torch.tensor(1.2)),
    # out of range (transformers' ranges)
    ("max_new_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", 2**64),
    ("stop_token_ids", "2"), ("stop_token_ids", [-1]), ("stop_token_ids", [49152]), ("stop_token_ids", [1.0]),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{name}={value!r}" for name, value in BAD_OPTIONS])
def test_bad_generate_option_is_a_value_error_naming_it(llm, name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        llm.generate(PROMPT, **{"max_new_tokens": 4, name: value})


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{name}={value!r}" for name, value in BAD_OPTIONS])
def test_bad_stream_option_is_refused_when_stream_is_called(llm, name, value):
    """Before the first piece is asked for: a stream never started is still checked."""
    with pytest.raises(ValueError, match=f"^{name} must be"):
        llm.stream(PROMPT, **{"max_new_tokens": 4, name: value})


def test_valid_edges_of_the_ranges_are_accepted(llm):
    """The closed ends of the ranges: temperature 0, top_k 1, top_p 1, min_p 0 and 1, the largest seed."""
    for options in (dict(temperature=0), dict(temperature=1, top_k=1), dict(temperature=1, top_p=1.0),
                    dict(temperature=1, min_p=1.0), dict(temperature=1, seed=2**64 - 1)):
        assert len(llm.generate(PROMPT, max_new_tokens=2, **options)[0].token_ids) >= 1, options


def test_one_stop_token_id_may_be_an_int(llm, greedy):
    """stop_token_ids=t equals stop_token_ids=[t]: generation stops before the first t."""
    full = greedy.token_ids
    stop = full[3]
    assert llm.generate(PROMPT, max_new_tokens=24, stop_token_ids=stop)[0].token_ids == full[:full.index(stop)]


# ---------------------------------------------------------------------------- prompts
BAD_PROMPTS = [
    (torch.tensor([1, 2, 3]), "prompts must be a string, a list of token ids"),
    (42, "prompts must be a string, a list of token ids"),
    (None, "prompts must be a string, a list of token ids"),
    ([], "prompts is empty"),
    ([[1.0, 2.0]], "prompt 0 must be a string or a list of token ids"),
    (["fine", 7], "prompt 1 must be a string or a list of token ids"),
    ([True, False], "prompt 0 must be a string or a list of token ids"),
    ([[-1, 2]], "prompt 0 has token ids outside the vocabulary"),
]


@pytest.mark.parametrize("prompts,message", BAD_PROMPTS, ids=[message[:20] + repr(p)[:20] for p, message in
                                                               BAD_PROMPTS])
def test_bad_prompt_is_a_value_error_naming_it(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, max_new_tokens=2)


def test_stream_refuses_a_batch(llm):
    with pytest.raises(ValueError, match="stream takes one prompt"):
        llm.stream(["a", "b"], max_new_tokens=2)


@pytest.mark.parametrize("tokens,message", [
    (torch.tensor([[1.0, 2.0]]), "integer tensor"), ([[1, 2], [3]], "all of one length"), ([1, 2, 3], "rows"),
    (torch.tensor([[1, 49152]]), r"token ids in \[0, 49152\)"),
])
def test_bad_logits_tokens_are_a_value_error(llm, tokens, message):
    with pytest.raises(ValueError, match=message):
        llm.logits(tokens)


# ---------------------------------------------------------------------------- from_pretrained
@pytest.fixture
def no_loading(monkeypatch):
    """Loading weights fails the test: an argument error must come before it."""
    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(llama.api, "load_model", load_model)


BAD_LOAD_ARGUMENTS = [
    (dict(device="gpu0"), "device 'gpu0': not a device"),
    (dict(device=0), "device must be"),
    (dict(dtype="fp8"), "dtype 'fp8': choose from"),
    (dict(dtype=torch.int8), "dtype must be"),
    (dict(max_seq_len=0), "max_seq_len must be >= 1"),
    (dict(max_seq_len="512"), "max_seq_len must be a whole number"),
    (dict(max_seq_len=10**6), "max_seq_len 1000000: more than the model's max_position_embeddings=8192"),
    (dict(max_batch_size=0), "max_batch_size must be >= 1"),
    (dict(compile="yes"), "compile must be True or False"),
    (dict(progress=None), "progress must be True or False"),
    (dict(quantize="int3"), "quantize='int3'"),
    (dict(quantize="int4", group_size=48), "group_size=48"),
]


@pytest.mark.parametrize("arguments,message", BAD_LOAD_ARGUMENTS, ids=[str(a) for a, _ in BAD_LOAD_ARGUMENTS])
def test_bad_from_pretrained_argument_is_refused_before_loading(smollm2_dir, no_loading, arguments, message):
    with pytest.raises(ValueError, match=message):
        llama.Llama.from_pretrained(smollm2_dir, **arguments)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_absent_device_is_refused_before_loading(smollm2_dir, no_loading, device):
    present = {"cuda": torch.cuda.is_available(), "cuda:7": torch.cuda.device_count() > 7,
               "mps": torch.backends.mps.is_available()}[device]
    if present:
        pytest.skip(f"{device} is present here")
    with pytest.raises(ValueError, match=f"device {device}: (not available here|this machine has)"):
        llama.Llama.from_pretrained(smollm2_dir, device=device)


def test_source_that_is_neither_folder_nor_repo_id_says_what_was_tried(no_loading, tmp_path):
    with pytest.raises(ValueError, match="source ./no/such/folder: no such folder, and not a hub repo id"):
        llama.Llama.from_pretrained("./no/such/folder")


def test_source_that_is_a_file_names_the_folder(smollm2_dir, no_loading):
    with pytest.raises(ValueError, match=f"is a file; give the checkpoint's folder; the folder that holds it is "
                                         f"{smollm2_dir}"):
        llama.Llama.from_pretrained(smollm2_dir / "model.safetensors")


def test_source_of_the_wrong_type_is_refused(no_loading):
    with pytest.raises(ValueError, match="source must be a folder or a hub repo id"):
        llama.Llama.from_pretrained(42)


def test_from_pretrained_resolves_a_hub_repo_id_like_the_command_line(smollm2_dir, llm, tmp_path, monkeypatch):
    """"local/smollm2", laid out in a Hugging Face cache as huggingface_hub lays it out, loads the same model."""
    import huggingface_hub.constants

    repo = tmp_path / "models--local--smollm2"
    shutil.copytree(smollm2_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_hub = llama.Llama.from_pretrained("local/smollm2", device="cpu", progress=False)
    assert from_hub.generate(PROMPT, max_new_tokens=6)[0].text == llm.generate(PROMPT, max_new_tokens=6)[0].text
