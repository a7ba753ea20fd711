"""Checkpoints in, a ready `Transformer` out: Hugging Face safetensors (one file or shards) and Meta's original
`consolidated.NN.pth` files.

The model is built on the meta device (no memory), given its final dtype, then materialised empty on the target
device; each tensor is then read from disk, converted and copied into place one at a time, so loading never holds
a second full copy of the weights (nor a float32 copy of a bf16 model) in host memory.

A broken checkpoint is a `CheckpointError` that names the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from llama import quant
from llama.config import ModelConfig
from llama.model import Transformer
from llama.quant import QuantizationConfig, QuantizedLinear, quantize_module_tree, read_quantization_config

if TYPE_CHECKING:
    from llama.tp import TensorParallel


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is. The message names the file and, where known, the tensor."""


def find_checkpoint(folder: str | Path) -> tuple[str, Path]:
    """("hf", folder) for config.json + *.safetensors, ("meta", folder) for params.json + consolidated.*.pth.
    The hub's meta-llama repos hold both: safetensors at the root, Meta's files in `original/`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")) + list(
        folder.glob("model.safetensors.index.json")
    ):
        return "hf", folder
    for candidate in (folder, folder / "original"):
        if (candidate / "params.json").exists() and list(candidate.glob("consolidated.*.pth")):
            return "meta", candidate
    raise CheckpointError(
        f"{folder}: holds no checkpoint: expected config.json with model.safetensors (or shards listed in "
        f"model.safetensors.index.json), or Meta's params.json with consolidated.00.pth"
    )


def load_model(
    folder: str | Path, device: torch.device, dtype: torch.dtype, progress: bool = True,
    tensor_parallel: TensorParallel | None = None, quantize: QuantizationConfig | None = None,
) -> tuple[ModelConfig, Transformer]:
    """The checkpoint's config and the model, on `device` in `dtype`. With `tensor_parallel`, this rank's part
    of the model, read slice by slice (see tp.py); the config returned is the whole model's.

    With `quantize` (quant.py), each weight is quantized on `device` as it is read, so the model is never held in
    full precision. A checkpoint written by `llama quantize` loads as it is (`quantize` may be None or must
    match it)."""
    kind, folder = find_checkpoint(folder)
    stored = read_quantization_config(folder) if kind == "hf" else None
    if stored and quantize and quantize != stored:
        raise ValueError(f"{folder} is already quantized ({stored.mode}"
                         + (f", group_size {stored.group_size}" if stored.group_size else "")
                         + f"); it cannot be loaded as {quantize.mode}: leave quantize out")
    quantize = stored or quantize
    if kind == "hf":
        config = ModelConfig.from_file(folder / "config.json")
        tensors = _hf_tensors(folder, config)
    else:
        shards = _meta_shards(folder)
        config = _meta_config(folder, shards)
        tensors = _meta_tensors(shards, config)
    with torch.device("meta"):
        model = Transformer(tensor_parallel.local_config(config) if tensor_parallel else config)
    model = model.to(dtype)
    if quantize:
        with torch.device("meta"):
            quantize_module_tree(model, quantize, dtype)
        if stored and tensor_parallel and stored.mode == "int4":  # row-parallel slices must hold whole groups
            from llama.tp import ROW_PARALLEL

            for name, layer in quant.quantized_layers(model).items():
                if name.endswith(ROW_PARALLEL) and layer.in_features % stored.group_size:
                    raise ValueError(f"{folder}: group_size {stored.group_size} does not divide the "
                                     f"{layer.in_features} input features of {name} that each of the "
                                     f"{tensor_parallel.world_size} ranks holds: use fewer ranks, or quantize on "
                                     f"load (--quantize int4)")
    try:
        model = model.to_empty(device=device)  # allocated once, in the final dtype, uninitialised
    except torch.OutOfMemoryError as e:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        raise MemoryError(
            f"{folder}: the weights need {size / 2**30:.1f} GiB in {dtype} and do not fit in {device}'s free memory; "
            f"use a smaller dtype, a larger device, or split the model over GPUs with torchrun (tensor parallelism)"
        ) from e
    model.tie_weights()
    model.rope.reset_parameters()  # inv_freq is computed in float32, not loaded
    _copy_into(model, tensors, progress, tensor_parallel.take if tensor_parallel else _whole, prequantized=stored)
    if quantize and config.tie_word_embeddings and not stored:  # the output projection's own int8 copy
        model.lm_head.load_rows_(0, model.embed_tokens.weight)
    if quantize:
        quant.pack(model)
    if tensor_parallel:
        tensor_parallel.attach(model)
    return config, model.eval()


def _whole(name: str, source: Any) -> Tensor:
    return source[:]  # a tensor, or a safetensors slice read completely


def load_targets(model: Transformer, prequantized: bool = False) -> dict[str, Tensor | QuantizedRows]:
    """Where each checkpoint tensor goes: its name in the engine's vocabulary -> the parameter, or the row block
    of a stacked parameter (q/k/v_proj in attention.qkv_proj, gate/up_proj in mlp.gate_up_proj).

    A quantized layer (quant.py) takes `.weight` as rows it quantizes as they are copied in, or, from a
    checkpoint that is already quantized (`prequantized`), its stored tensors (`.qweight`, `.scales`, ...)."""
    if prequantized:
        return dict(_checkpoint_tensors(model))
    targets: dict[str, Tensor | QuantizedRows] = dict(_checkpoint_tensors(model, with_quantized=False))
    tied_copy = model.config.tie_word_embeddings and isinstance(model.lm_head, QuantizedLinear)
    for module_name, layer in quant.quantized_layers(model).items():
        if module_name == "lm_head" and tied_copy:
            continue  # filled from the embedding table after loading
        for part, rows in _row_blocks(model, module_name):
            targets[f"{part}.weight"] = QuantizedRows(layer, rows)
    return targets


def _checkpoint_tensors(model: Transformer, with_quantized: bool = True) -> Iterator[tuple[str, Tensor]]:
    """Each tensor a checkpoint of the model holds, under its name in the engine's vocabulary, as a view of the
    model's own storage (copying into it fills the model): the parameters, stacked ones cut into their row blocks,
    then the quantized layers' stored buffers, cut the same way."""
    for name, param in model.named_parameters():  # tied weights appear once, under their first name
        module_name, _, kind = name.rpartition(".")  # kind: "weight" or "bias"
        for part, rows in _row_blocks(model, module_name):
            yield f"{part}.{kind}", param[rows]
    for module_name, layer in quant.quantized_layers(model).items() if with_quantized else ():
        for part, rows in _row_blocks(model, module_name):
            for stored in layer.stored:
                yield f"{part}.{stored}", getattr(layer, stored)[rows]


def _row_blocks(model: Transformer, module_name: str) -> list[tuple[str, slice]]:
    """The checkpoint's modules that fill module_name, each with its rows: q/k/v_proj in qkv_proj, gate/up_proj
    in gate_up_proj, else the module itself, whole."""
    prefix, _, leaf = module_name.rpartition(".")
    if leaf not in _STACKED:
        return [(module_name, slice(None))]
    module = model.get_submodule(module_name)
    sizes = (model.get_submodule(prefix).qkv_sizes if leaf == "qkv_proj" else [module.out_features // 2] * 2)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(f"{prefix}.{part}", slice(start, start + size))
            for part, start, size in zip(_STACKED[leaf], starts, sizes)]


class QuantizedRows:
    """Rows of a quantized layer, as a load target: `copy_(dense)` quantizes the dense rows into it."""

    def __init__(self, layer: QuantizedLinear, rows: slice):
        self.layer = layer
        self.start = rows.start or 0
        self.shape = ((rows.stop or layer.out_features) - self.start, layer.in_features)

    def copy_(self, dense: Tensor) -> None:
        self.layer.load_rows_(self.start, dense)


_STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _copy_into(model: Transformer, tensors: Iterator[tuple[str, str, Any]], progress: bool,
               take: Callable[[str, Any], Tensor] = _whole, prequantized: bool = False) -> None:
    """Copy (name, origin, source) triples into the model's parameters, every target exactly once. A source is a
    tensor or a safetensors slice; `take` reads the part this process holds (all of it without parallelism)."""
    targets = load_targets(model, prequantized)
    loaded: set[str] = set()
    bar = tqdm(total=len(targets), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for name, origin, source in tensors:
        if name not in targets:
            raise CheckpointError(f"{origin}: unexpected tensor {name!r}: the model has no such parameter")
        target = targets[name]
        try:
            tensor = take(name, source)
        except Exception as e:  # safetensors reads lazily: a truncated file can fail only here
            raise CheckpointError(f"{origin}: cannot read the tensor ({type(e).__name__}: {e})") from e
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(target.shape)}"
            )
        if isinstance(target, Tensor) and target.dtype in (torch.int8, torch.uint8) and tensor.dtype != target.dtype:
            raise CheckpointError(f"{origin}: tensor {name!r} is {tensor.dtype}, the quantized layer stores "
                                  f"{target.dtype}")
        with torch.no_grad():
            target.copy_(tensor)  # converts dtype and moves to the device in one step (or quantizes, there)
        loaded.add(name)
        bar.update()
    bar.close()
    missing = sorted(set(targets) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {', '.join(missing[:5])}" + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


# ---------------------------------------------------------------------------- Hugging Face safetensors
# Hugging Face name prefix <-> this engine's ({} stands for the layer index); the regexes go both ways
_PREFIXES = [
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    ("model.layers.{}.self_attn.", "layers.{}.attention."),
    ("model.layers.{}.input_layernorm.", "layers.{}.attention_norm."),
    ("model.layers.{}.post_attention_layernorm.", "layers.{}.mlp_norm."),
    ("model.layers.{}.mlp.", "layers.{}.mlp."),
    ("lm_head.", "lm_head."),
]


def _renames(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("^" + re.escape(old).replace(r"\{\}", r"(\d+)"), new.replace("{}", r"\1")) for old, new in pairs]


_HF_RENAMES = _renames(_PREFIXES)
_ENGINE_RENAMES = _renames([(engine, hf) for hf, engine in _PREFIXES])


def hf_to_engine_name(name: str) -> str | None:
    """Hugging Face tensor name -> this engine's parameter name (None: a buffer older checkpoints saved)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, replacement in _HF_RENAMES:
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name  # reported as unexpected by _copy_into


def hf_shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards listed in model.safetensors.index.json, or the one
    model.safetensors. A shard named by the index but absent is an error naming it."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).exists()]
        if absent:
            raise CheckpointError(f"{index_path}: shard {absent[0]} is listed in the index but missing from {folder}"
                                  + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        return [folder / f for f in files]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def _hf_tensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, str, Any]]:
    files = hf_shard_files(folder)
    bar = tqdm(files, desc="safetensors shards", unit="file", disable=len(files) == 1, leave=False)
    for path in bar:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    engine_name = hf_to_engine_name(name)
                    if engine_name is None or (engine_name == "lm_head.weight" and config.tie_word_embeddings):
                        continue  # tied checkpoints sometimes store the (identical) output matrix as well
                    yield engine_name, f"{path} ({name})", f.get_slice(name)  # read when sliced
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------- Meta consolidated.NN.pth
# Meta's reference splits each Linear across model-parallel ranks (fairscale):
#   column-parallel (output features split, concatenate on dim 0): wq, wk, wv, w1, w3, output
#   row-parallel    (input features split, concatenate on dim 1):  wo, w2
#   token embeddings: Llama 2's ParallelEmbedding splits the width (dim 1), Llama 3's VocabParallelEmbedding
#   the vocabulary (dim 0); a shard whose width is the full model width was split on dim 0.
#   norms are replicated.
_META_NAMES = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "attention.q_proj.weight",
    "attention.wk.weight": "attention.k_proj.weight",
    "attention.wv.weight": "attention.v_proj.weight",
    "attention.wo.weight": "attention.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
}
_COLUMN_PARALLEL = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_ROW_PARALLEL = ("wo.weight", "w2.weight")


def _meta_shards(folder: Path) -> list[tuple[Path, dict[str, Tensor]]]:
    paths = sorted(folder.glob("consolidated.*.pth"))
    for rank in range(len(paths)):  # shards are numbered 00, 01, ... without gaps
        expected = folder / f"consolidated.{rank:02d}.pth"
        if expected not in paths:
            raise CheckpointError(f"{folder}: model-parallel shard {expected.name} is missing "
                                  f"(found {', '.join(p.name for p in paths)})")
    shards = []
    for path in paths:
        try:  # mmap: tensors are read from disk when touched, one at a time
            shards.append((path, torch.load(path, map_location="cpu", mmap=True, weights_only=True)))
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
    return shards


def _meta_config(folder: Path, shards: list[tuple[Path, dict[str, Tensor]]]) -> ModelConfig:
    path, first = shards[0]
    if "tok_embeddings.weight" not in first:
        raise CheckpointError(f"{path}: tensor 'tok_embeddings.weight' is missing")
    params = json.loads((folder / "params.json").read_text())
    rows, width = first["tok_embeddings.weight"].shape
    vocab_size = rows * len(shards) if width == params.get("dim") else rows
    config = ModelConfig.from_meta_params(params, str(folder / "params.json"), vocab_size=vocab_size)
    if "output.weight" not in first:  # Llama 3.2's Meta checkpoints may leave the output matrix tied
        config = dataclasses.replace(config, tie_word_embeddings=True)
    return config


def permute_meta_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a Meta q or k projection ([n_heads * D, C]) from Meta's rotation layout, in which
    features (2j, 2j+1) of a head form a rotating pair, to the Hugging Face layout used by `apply_rope`, in which
    features (j, j + D/2) do: new row j = old row 2j, new row D/2 + j = old row 2j + 1, within every head.
    For k, n_heads is the number of kv heads (using the query head count breaks GQA models)."""
    rows, C = w.shape
    D = rows // n_heads
    return w.view(n_heads, D // 2, 2, C).transpose(1, 2).reshape(rows, C)


def _meta_tensors(shards: list[tuple[Path, dict[str, Tensor]]], config: ModelConfig) -> Iterator[
        tuple[str, str, Tensor]]:
    folder = shards[0][0].parent
    for name in shards[0][1]:
        if name == "rope.freqs":  # Llama 2 saved its rotary table; ours is computed
            continue
        layer = re.match(r"^layers\.(\d+)\.(.+)$", name)
        key = layer.group(2) if layer else name
        if key not in _META_NAMES:
            raise CheckpointError(f"{shards[0][0]}: unexpected tensor {name!r}: the model has no such parameter")
        engine_name = (f"layers.{layer.group(1)}." if layer else "") + _META_NAMES[key]
        pieces = []
        for path, state in shards:
            if name not in state:
                raise CheckpointError(f"{path}: tensor {name!r} is missing from this shard")
            pieces.append(state[name])
        if len(pieces) == 1 or name.endswith("norm.weight"):
            tensor = pieces[0]
        elif name.endswith(_COLUMN_PARALLEL):
            tensor = torch.cat(pieces, dim=0)
        elif name.endswith(_ROW_PARALLEL):
            tensor = torch.cat(pieces, dim=1)
        else:  # token embeddings: see the comment above _META_NAMES
            tensor = torch.cat(pieces, dim=0 if pieces[0].shape[1] == config.dim else 1)
        heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}.get(key)
        if heads and tensor.shape[0] == heads * config.head_dim:  # a wrong shape is reported by _copy_into
            tensor = permute_meta_rotary(tensor, heads)
        yield engine_name, f"{folder}/consolidated.*.pth ({name})", tensor


# ---------------------------------------------------------------------------- writing a quantized checkpoint
SHARD_BYTES = 4 * 2**30  # safetensors files of at most this many bytes (as Hugging Face shards)
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "original/tokenizer.model")


def engine_to_hf_name(name: str) -> str:
    """The inverse of `hf_to_engine_name`."""
    for pattern, replacement in _ENGINE_RENAMES:
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name


def save_quantized(model: Transformer, quantization: QuantizationConfig | None, source: Path | dict, out: Path,
                   progress: bool = True) -> list[Path]:
    """Write a quantized model as a Hugging Face folder: its tensors under their Hugging Face names (stacked
    projections split back into q/k/v and gate/up; a quantized layer's stored buffers as `.qweight`, `.scales`,
    `.mins`), config.json from `source` (a folder, whose tokenizer and generation files are copied too, or the
    config as a dict) plus a `quantization_config`, sharded above SHARD_BYTES. `from_pretrained(out)` loads it as
    it is. (With quantization None it writes a dense model the same way: the benchmarks' random checkpoints.)
    Returns the safetensors files written."""
    from safetensors.torch import save_file

    config = dict(source) if isinstance(source, dict) else json.loads((source / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a stale shard would be read as part of the new checkpoint
    tensors = {engine_to_hf_name(name): tensor for name, tensor in _checkpoint_tensors(model)}

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files = [out / "model.safetensors"] if len(shards) == 1 else [
        out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for path, shard in tqdm(list(zip(files, shards)), desc="writing", unit="file", disable=not progress,
                            leave=False):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(path),
                  metadata={"format": "pt"})
    if len(files) > 1:
        weight_map = {name: path.name for path, shard in zip(files, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if quantization:
        config["quantization_config"] = quantization.to_json()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in _SIDE_FILES if isinstance(source, Path) else ():
        if (source / side).exists() and (source / side).resolve() != (out / side).resolve():
            (out / side).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / side, out / side)
    return files
