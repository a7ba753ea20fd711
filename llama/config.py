"""The model configuration: one typed dataclass, read from Hugging Face `config.json` or Meta `params.json`.

Every key that changes the math is read; a key whose meaning the engine cannot honour is a `ConfigError` that
names it; a key the engine has never heard of is reported in a warning rather than dropped silently.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class ConfigError(ValueError):
    """A configuration the engine cannot honour. The message names the file and the key."""


@dataclass(frozen=True)
class RopeConfig:
    """How rotary position embeddings turn a position into angles (see `llama.model.rope_inv_freq`)."""

    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10_000.0  # the base: inv_freq[i] = theta^(-2i/D)
    factor: float = 1.0  # linear / dynamic / yarn / llama3 context-extension factor
    original_max_position_embeddings: int | None = None  # llama3 / yarn: the pre-training context length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scale of cos/sin (None: derived from factor and mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama network. Names follow the shape legend used in `llama/model.py`."""

    vocab_size: int  # V
    dim: int  # model width (hidden_size)
    n_layers: int
    n_heads: int  # H: query heads
    n_kv_heads: int  # K: key/value heads (K == H: MHA, 1 < K < H: GQA, K == 1: MQA)
    head_dim: int  # D: need not equal dim / n_heads
    ffn_dim: int  # SwiGLU hidden width (intermediate_size)
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # the output projection reuses the token embedding matrix
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on gate/up/down projections
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope.type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        """Read a `config.json` (Hugging Face) or a `params.json` (Meta), by file name."""
        path = Path(path)
        data = read_json(path)
        if path.name == "params.json":
            return cls.from_meta_params(data, source=str(path), **overrides)
        return cls.from_hf_config(data, source=str(path))

    # ---------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        keys = _Keys(config, source)
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {model_type!r} is not a Llama model (expected 'llama')")
        for key, allowed in _MUST_EQUAL.items():
            if key in config and config[key] not in allowed:
                raise ConfigError(f"{source}: {key}={config[key]!r} is not supported (supported: {allowed})")
        quantization = config.get("quantization_config")  # (read by quant.py; only the engine's own is honoured)
        if quantization is not None and not (isinstance(quantization, dict)
                                             and quantization.get("quant_method") == "llamaref"):
            method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
            raise ConfigError(f"{source}: quantization_config with quant_method {method!r} is not supported (only "
                              f"'llamaref', written by `llama quantize`)")
        unknown = sorted(set(config) - _HF_KEYS_READ - set(_MUST_EQUAL) - _HF_KEYS_WITHOUT_EFFECT)
        if unknown:
            warnings.warn(f"{source}: keys not used by this engine: {', '.join(unknown)}", stacklevel=3)

        dim, n_heads = keys.integer("hidden_size"), keys.integer("num_attention_heads")
        n_kv_heads = keys.integer("num_key_value_heads", n_heads)
        _check_heads(source, ("hidden_size", dim), ("num_attention_heads", n_heads),
                     ("num_key_value_heads", n_kv_heads), "head_dim" in config and config["head_dim"] is not None)
        return _construct(
            cls, source,
            vocab_size=keys.integer("vocab_size"),
            dim=dim,
            n_layers=keys.integer("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=keys.integer("head_dim", dim // n_heads),
            ffn_dim=keys.integer("intermediate_size"),
            norm_eps=keys.number("rms_norm_eps", 1e-6, minimum=0.0),
            max_position_embeddings=keys.integer("max_position_embeddings", 2048),
            tie_word_embeddings=keys.flag("tie_word_embeddings", False),
            attention_bias=keys.flag("attention_bias", False),
            mlp_bias=keys.flag("mlp_bias", False),
            rope=_rope_from_hf(keys),
            bos_token_id=keys.integer("bos_token_id", None, minimum=0),
            eos_token_ids=keys.token_ids("eos_token_id"),
        )

    # ---------------------------------------------------------------- Meta params.json
    @classmethod
    def from_meta_params(
        cls, params: dict[str, Any], source: str = "params.json", vocab_size: int | None = None
    ) -> ModelConfig:
        """Meta's `params.json`. Llama 2 says `vocab_size: -1`: pass the size read off the embedding tensor."""
        keys = _Keys(params, source)
        for key in ("quantization_args", "lora_args", "vision_chunk_size", "moe_args"):
            if params.get(key) not in (None, -1):
                raise ConfigError(f"{source}: {key!r} is not supported by this engine")
        dim, n_heads, n_layers = keys.integer("dim"), keys.integer("n_heads"), keys.integer("n_layers")
        n_kv_heads = keys.integer("n_kv_heads", n_heads)
        _check_heads(source, ("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), False)
        if params.get("vocab_size", -1) not in (-1, None):
            vocab_size = keys.integer("vocab_size")
        if vocab_size is None:
            raise ConfigError(f"{source}: vocab_size is -1 and no embedding tensor was given to read it from")

        theta = keys.number("rope_theta", 10_000.0, minimum=0.0, open_minimum=True)
        if keys.flag("use_scaled_rope", False):
            # Meta's reference hard-codes factor 8 (Llama 3.1); Llama 3.2 1B/3B were trained with 32 and their
            # params.json does not say so, so the two 3.2 shapes are recognised here.
            default_factor = 32.0 if (dim, n_layers) in {(2048, 16), (3072, 28)} else 8.0
            rope = RopeConfig(
                type="llama3",
                theta=theta,
                factor=keys.number("rope_scaling_factor", default_factor, minimum=0.0, open_minimum=True),
                low_freq_factor=1.0,
                high_freq_factor=keys.number("rope_high_freq_factor", 4.0, minimum=1.0, open_minimum=True),
                original_max_position_embeddings=8192,
            )
            max_pos = 131_072
        else:
            rope = RopeConfig(theta=theta)
            # Llama 2: 4096; Code Llama (theta 1e6): 16384; Llama 3: 8192.
            max_pos = {1_000_000.0: 16_384, 500_000.0: 8192}.get(theta, 4096)
        return _construct(
            cls, source,
            vocab_size=vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=dim // n_heads,
            ffn_dim=meta_ffn_dim(dim, keys.integer("multiple_of", 256),
                                 keys.number("ffn_dim_multiplier", None, minimum=0.0, open_minimum=True)),
            norm_eps=keys.number("norm_eps", 1e-5, minimum=0.0),
            max_position_embeddings=keys.integer("max_seq_len", max_pos),
            rope=rope,
        )


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), times an optional
    multiplier, rounded up to a multiple of `multiple_of`. Llama 2 7B: 11008; Llama 3 8B: 14336."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# ---------------------------------------------------------------- RoPE spellings
_REQUIRED = object()

_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
        "mscale", "mscale_all_dim", "truncate",
    },
}
_REQUIRED_ROPE_KEYS = {"linear": {"factor"}, "dynamic": {"factor"}, "llama3": {"factor", "low_freq_factor",
                                                                                "high_freq_factor"}}


def _rope_from_hf(keys: _Keys) -> RopeConfig:
    """Both spellings: transformers 4.x `rope_theta` + `rope_scaling` ({"type"|"rope_type": ...} or null), and
    transformers 5.x `rope_parameters` ({"rope_type", "rope_theta", ...}). As in transformers, `rope_scaling`
    takes precedence when both are present."""
    config, source = keys.data, keys.source
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    section = _Keys(config.get(key) or {}, source, prefix=f"{key}.")
    params = dict(section.data)
    theta = section.number("rope_theta", None, minimum=0.0, open_minimum=True)
    if theta is None:
        theta = keys.number("rope_theta", 10_000.0, minimum=0.0, open_minimum=True)
    params.pop("rope_theta", None)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if not isinstance(rope_type, str) or rope_type not in _ROPE_KEYS:
        raise ConfigError(
            f"{source}: {key}.rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    unknown = set(params) - _ROPE_KEYS[rope_type]
    if rope_type == "default":
        unknown -= {"factor"}  # some checkpoints carry a meaningless factor 1.0 next to "default"
    if unknown:
        raise ConfigError(f"{source}: {key} keys {sorted(unknown)} have no meaning for rope_type {rope_type!r}")
    missing = _REQUIRED_ROPE_KEYS.get(rope_type, set()) - set(params)
    if missing:
        raise ConfigError(f"{source}: {key} for rope_type {rope_type!r} is missing {sorted(missing)}")

    max_pos = keys.integer("max_position_embeddings", 2048)
    original = section.integer("original_max_position_embeddings", None)
    if rope_type in ("llama3", "yarn") and original is None:
        original = max_pos  # transformers' default
    factor = section.number("factor", None, minimum=0.0, open_minimum=True)
    if rope_type == "yarn" and factor is None:
        factor = max_pos / original  # DeepSeek-style configs give the two lengths instead of a factor
    low_freq_factor = section.number("low_freq_factor", 1.0, minimum=0.0, open_minimum=True)
    high_freq_factor = section.number("high_freq_factor", 4.0, minimum=0.0, open_minimum=True)
    if rope_type == "llama3" and not high_freq_factor > low_freq_factor:  # (the smooth ramp divides by the gap)
        raise ConfigError(f"{source}: {key}.high_freq_factor={high_freq_factor} must be larger than "
                          f"low_freq_factor={low_freq_factor}")
    return RopeConfig(
        type=rope_type,
        theta=theta,
        factor=factor if rope_type != "default" and factor is not None else 1.0,
        original_max_position_embeddings=original,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
        beta_fast=section.number("beta_fast", None) or 32.0,
        beta_slow=section.number("beta_slow", None) or 1.0,
        attention_factor=section.number("attention_factor", None, minimum=0.0, open_minimum=True),
        mscale=section.number("mscale", None),
        mscale_all_dim=section.number("mscale_all_dim", None),
        truncate=section.flag("truncate", True),
    )


def _construct(cls: type[ModelConfig], source: str, **fields: Any) -> ModelConfig:
    """cls(**fields), with its own checks' messages (head_dim must be even, say) naming the file too."""
    try:
        return cls(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_heads(source: str, dim: tuple[str, int], n_heads: tuple[str, int], n_kv_heads: tuple[str, int],
                 head_dim_given: bool) -> None:
    """The attention layout's arithmetic, in the file's own key names: (key, value) pairs."""
    if n_heads[1] % n_kv_heads[1]:
        raise ConfigError(f"{source}: {n_heads[0]}={n_heads[1]} must be a multiple of "
                          f"{n_kv_heads[0]}={n_kv_heads[1]} (each key/value head serves a whole group of heads)")
    if not head_dim_given and dim[1] % n_heads[1]:
        raise ConfigError(f"{source}: {dim[0]}={dim[1]} is not a multiple of {n_heads[0]}={n_heads[1]}, so the "
                          f"heads cannot split the width (and no head_dim is given)")


def read_json(path: Path) -> Any:
    """A JSON file's contents; a file that is missing, unreadable or not JSON is a ConfigError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e


class _Keys:
    """Typed reads of a config file's keys. A key that is absent or null takes its default (a required key has
    none); a value of the wrong type or out of range is a ConfigError naming the file and the key."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        if not isinstance(data, dict):
            where = f"{source}: {prefix[:-1]}" if prefix else source
            raise ConfigError(f"{where}: expected a JSON object ({{...}}), got {_json_kind(data)}")
        self.data, self.source, self.prefix = data, source, prefix

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None and default is _REQUIRED:
            raise ConfigError(f"{self.source}: required key {self.prefix + key!r} is missing")
        return value

    def _bad(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}={value!r}: expected {expected}")

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
        value = self._get(key, default)
        if value is None:
            return default
        # (JSON writers may spell a whole number as 4096.0)
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise self._bad(key, value, f"a whole number >= {minimum}")
        if value < minimum:
            raise self._bad(key, value, f"a whole number >= {minimum}")
        return int(value)

    def number(self, key: str, default: Any = _REQUIRED, minimum: float | None = None,
               open_minimum: bool = False) -> Any:
        value = self._get(key, default)
        if value is None:
            return default
        bound = "" if minimum is None else f" {'>' if open_minimum else '>='} {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, value, f"a finite number{bound}")
        if minimum is not None and (value <= minimum if open_minimum else value < minimum):
            raise self._bad(key, value, f"a number{bound}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):  # bool("false") would be True
            raise self._bad(key, value, "true or false")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One token id or a list of them (eos_token_id)."""
        value = self._get(key, ())
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise self._bad(key, value, "a token id (a whole number >= 0) or a list of them")
        return tuple(values)


def _json_kind(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# config.json keys read above
_HF_KEYS_READ = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "bos_token_id", "eos_token_id", "quantization_config",
}
# keys that change the math, with the only values the engine implements
_MUST_EQUAL = {
    "hidden_act": ("silu",),
    "sliding_window": (None,),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
}
# keys that do not change inference (training knobs, bookkeeping, or math-equivalent variants)
_HF_KEYS_WITHOUT_EFFECT = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
    "pad_token_id", "pretraining_tp", "attention_dropout", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "is_decoder", "tie_encoder_decoder",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "max_length", "auto_map",
    "_attn_implementation_autoset", "unk_token_id", "cross_attention_hidden_size", "add_cross_attention",
    "finetuning_task", "use_return_dict", "torchscript", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
}
