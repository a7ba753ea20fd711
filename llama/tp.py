"""Tensor parallelism: one model split over the ranks of a `torchrun` job, added from outside `model.py`.

The Megatron split, as in Meta's reference and gpt-fast. With W ranks, rank r holds:
  - q/k/v and gate/up projections column-parallel: rows r*N/W .. (r+1)*N/W of each (its own query heads, kv heads
    and SwiGLU columns), so attention and the SwiGLU product run on local heads / columns with no communication;
  - o and down projections row-parallel: the matching input columns; each rank's output is a partial sum, and
    one all-reduce per projection (two per block) restores the full residual update on every rank;
  - embeddings, norms and the output projection replicated: every rank then computes the same logits and, with
    the same random stream, samples the same tokens, with no gather of a split vocabulary. (The output matrix is
    1-2 GB for Llama 3; splitting it would save that memory per rank at the cost of a gather per step.)

The model each rank builds is simply a Llama with H/W query heads, K/W kv heads and F/W SwiGLU columns; a
checkpoint's tensors are sliced as they are read (safetensors' `get_slice`), so no rank holds the whole model.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from llama.config import ConfigError, ModelConfig
from llama.model import Transformer

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world_size: int

    @classmethod
    def from_environment(cls) -> TensorParallel | None:
        """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) if nobody has."""
        if world_size() == 1:
            return None
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            atexit.register(shutdown)  # we joined it, so we leave it
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), dist.get_world_size())

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape of this rank's part of the model."""
        W = self.world_size
        for key, value in (("num_key_value_heads", config.n_kv_heads), ("num_attention_heads", config.n_heads),
                           ("intermediate_size", config.ffn_dim)):
            if value % W:
                raise ConfigError(
                    f"{key}={value} is not divisible by the {W} tensor-parallel ranks: each rank must hold whole "
                    f"kv heads (and their query heads); run with a number of processes that divides {value}"
                )
        return replace(config, n_heads=config.n_heads // W, n_kv_heads=config.n_kv_heads // W,
                       ffn_dim=config.ffn_dim // W)

    def take(self, name: str, source: Any) -> Tensor:
        """This rank's slice of checkpoint tensor `name` (engine naming). `source` is a tensor or a safetensors
        slice: indexing the latter reads only the requested rows or columns from disk."""
        module, kind = name.split(".")[-2:]
        shape = source.get_shape() if hasattr(source, "get_shape") else list(source.shape)
        r, W = self.rank, self.world_size
        if module in COLUMN_PARALLEL:
            n = shape[0] // W
            return source[r * n:(r + 1) * n]
        if module in ROW_PARALLEL:
            if kind == "bias":  # added once, after the all-reduce sums the ranks' partial outputs
                return source[:] if r == 0 else torch.zeros(shape)
            if len(shape) == 1:  # an int8 layer's scales: one per output row, the same on every rank
                return source[:]
            if shape[1] % W:  # (an int4 layer's groups must not straddle two ranks)
                raise ValueError(f"{name}: its {shape[1]} columns do not split evenly over {W} tensor-parallel "
                                 f"ranks; run with a number of processes that divides it")
            n = shape[1] // W
            return source[:, r * n:(r + 1) * n]
        return source[:]

    def attach(self, model: Transformer) -> None:
        """Sum the row-parallel projections' partial outputs over the ranks."""
        for layer in model.layers:
            layer.attention.o_proj.register_forward_hook(_all_reduce)
            layer.mlp.down_proj.register_forward_hook(_all_reduce)


def _all_reduce(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    # The functional collective returns a new tensor and is traced by torch.compile (an in-place
    # dist.all_reduce would break the decode graph).
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def shutdown() -> None:
    """Leave the process group, if one was joined, so that a finished torchrun job exits.

    CUDA graphs that captured NCCL all-reduces (`compile=True`) must be freed first: destroying the communicator
    while such a graph is alive waits forever (pytorch/pytorch#115388)."""
    if not dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch._dynamo.reset()  # drops the compiled decode step and its CUDA graph trees
        gc.collect()
    dist.destroy_process_group()


def shared_seed(seed: int | None) -> int | None:
    """The same seed on every rank (rank 0's), so that every rank samples the same tokens."""
    if world_size() == 1 or not dist.is_initialized():
        return seed
    box = [seed if seed is not None else int(torch.randint(0, 2**62, ()).item())]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (the chat message typed on rank 0's terminal, for one)."""
    if world_size() == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
