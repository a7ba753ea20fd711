"""Weight-only quantization: int8 per output channel and int4 per group of input features, added to a model from
outside `model.py` (the way tp.py adds tensor parallelism): the loader swaps each `nn.Linear` of the blocks, and
the output projection, for a quantized layer before any weight is read, and fills it tensor by tensor.

    int8   w[n, k] ~ q[n, k] * scale[n]                      q in [-127, 127], scale[n] = max_k |w[n, k]| / 127
    int4   w[n, k] ~ q[n, k] * scale[n, g] + min[n, g]       q in [0, 15], g = k // group_size, over each group:
                                                             min = min_k w, scale = (max_k w - min_k w) / 15

int8 is symmetric with one scale per output channel (as gpt-fast and torchao); int4 is asymmetric per group of
`group_size` consecutive input features, "a scale and a minimum" as in GGUF's Q4_1 (tinygemm's "scale and zero
point" is the same grid: zero = min + 8 * scale, q - 8). Activations stay in the model dtype; every product is
accumulated in float32.

Which layers: every projection of the blocks (q/k/v, o, gate/up, down) in the chosen mode, and the output
projection (lm_head) in int8 in both modes: it is 7% of an 8B model's bytes and 21% of SmolLM2's, and int4 on it
costs more perplexity than it saves time (docs/benchmarks.md). The embedding table stays in the model dtype: a
token reads one row of it, so it costs memory, not speed. A tied output projection gets its own int8 copy.

Stored layout (the layers' buffers, and the tensors of a saved checkpoint, suffixes of the Hugging Face names):
    int8   qweight int8 [N, K], scales [N]
    int4   qweight uint8 [N, Kp / 2] (q[n, 2j] in the low nibble of byte j, q[n, 2j+1] in the high one),
           scales and mins [N, Kp / G]; Kp = K rounded up to a multiple of G (the padding's inputs are zero)
How a layer multiplies: on a GPU, the Triton kernels of quant_kernels.py read this layout directly (up to
GPU_DENSE_ROWS rows of x; a prefill of more is dequantized and multiplied by one cuBLAS matmul); on a CPU, a
float32 decode step (up to cpu_kernels.MAX_ROWS rows) goes through the C++ kernels of cpu_kernels.py, which read it
directly too, and a prefill is dequantized and multiplied by one dense matmul. Where those kernels cannot be built,
or x is not float32, one row goes through torch's own weight-only ops (int4 from a copy in their layout that
`pack` makes), or under torch.compile through the product written as a plain reduction for Inductor's C++ backend.
`use_reference` switches every layer to the plain formula (dequantize, then `F.linear`), the path the kernels are
tested against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama import cpu_kernels
from llama.model import silu_mul

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
GPU_DENSE_ROWS = 512  # from this many rows of x (a prefill) a GPU layer dequantizes and runs one cuBLAS matmul:
# the Triton kernels are built for decode batches, and a prefill is bound by the arithmetic, where cuBLAS is best
QUANT_METHOD = "llamaref"  # config.json's quantization_config.quant_method for checkpoints written by `llama quantize`


@dataclass(frozen=True)
class QuantizationConfig:
    mode: str  # "int8" or "int4"
    group_size: int | None = None  # int4 only

    @classmethod
    def make(cls, quantize: str | None, group_size: int | None) -> QuantizationConfig | None:
        """Check the user's `quantize` and `group_size` arguments; None when nothing is quantized."""
        if quantize is None:
            if group_size is not None:
                raise ValueError(f"group_size={group_size!r} needs quantize='int4'")
            return None
        if quantize not in MODES:
            raise ValueError(f"quantize={quantize!r}: choose from {', '.join(MODES)}")
        if quantize == "int8":
            if group_size is not None:
                raise ValueError(f"group_size={group_size!r}: int8 has one scale per output channel, no groups")
            return cls("int8")
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r}: choose from {', '.join(map(str, GROUP_SIZES))}")
        return cls("int4", int(group_size))

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "mode": self.mode, "group_size": self.group_size,
                "output": "int8", "modules_not_quantized": ["embed_tokens"]}

    @classmethod
    def from_json(cls, data: Any, source: str) -> QuantizationConfig:
        """config.json's quantization_config, as `to_json` writes it; anything else is a ValueError naming it."""
        if not isinstance(data, dict) or data.get("quant_method") != QUANT_METHOD:
            method = data.get("quant_method") if isinstance(data, dict) else data
            raise ValueError(f"{source}: quantization_config with quant_method {method!r} is not supported (only "
                             f"{QUANT_METHOD!r}, written by `llama quantize`)")
        try:
            return cls.make(data.get("mode"), data.get("group_size"))
        except ValueError as e:
            raise ValueError(f"{source}: quantization_config: {e}") from None


def read_quantization_config(folder: Path) -> QuantizationConfig | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("quantization_config") is None:
        return None
    return QuantizationConfig.from_json(data["quantization_config"], str(path))


# ---------------------------------------------------------------------------- the formulas
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]) with w ~ q * scale[:, None]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps a tiny nonzero scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (qweight uint8 [N, Kp/2], scales float32 [N, Kp/G], mins float32 [N, Kp/G]).

    Each group of G consecutive input features gets min = its smallest weight and scale = its range / 15, so its
    smallest and largest weights are exact; q = round((w - min) / scale). A K that G does not divide is padded by
    repeating each row's last weight, which widens no group's range."""
    N, K = w.shape
    w = w.float()
    padded = -(-K // group_size) * group_size
    if padded != K:
        w = torch.cat([w, w[:, -1:].expand(N, padded - K)], dim=1)
    groups = w.view(N, padded // group_size, group_size)  # [N, Kp/G, G]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, Kp/G]
    scale = ((high - low) / 15).clamp(min=1e-12)  # a constant group: any scale, q = 0 is exact
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, padded)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, low


def unpack_int4(qweight: Tensor) -> Tensor:
    """uint8 [N, Kp/2] -> the 4-bit values q [N, Kp] (uint8): low nibble first."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).view(qweight.shape[0], -1)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, group_size: int, in_features: int) -> Tensor:
    q = unpack_int4(qweight).float()  # [N, Kp]
    scale = scales.float().repeat_interleave(group_size, dim=1)
    low = mins.float().repeat_interleave(group_size, dim=1)
    return (q * scale + low)[:, :in_features]


# ---------------------------------------------------------------------------- the layers
class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: the shape, an optional bias, loading rows, and the kernel choice."""

    stored: tuple[str, ...] = ()  # the buffers a saved checkpoint holds

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.padded_in_features = in_features  # the features the kernels read (int4 pads them to whole groups)
        self.kernel = True  # False: the reference formula
        self.packed = False  # `pack` has run (the loader calls it; a layer made by hand, at its first product)
        self.native = False  # the C++ kernels of cpu_kernels.py (chosen by `pack` on a CPU)

    def load_rows_(self, start: int, dense: Tensor) -> None:
        """Quantize dense rows [n, K] (any float dtype, any device) into rows start .. start + n."""
        raise NotImplementedError

    def dequantized(self) -> Tensor:
        """The weight the layer multiplies by, [N, K] float32."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if not self.packed and not x.is_cuda:
            self.pack()
        if self.kernel and (rows < GPU_DENSE_ROWS if x.is_cuda else rows == 1 or self._native(x, rows)):
            y = self._kernel(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        else:  # a prefill: dequantize + one dense matmul (cuBLAS, MKL), faster than the weight-only kernels there
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def fused(self, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None,
              swiglu: bool = False) -> Tensor:
        """residual + self(norm(x)), norm an RMSNorm (either may be None), or with swiglu silu_mul(self(norm(x)))
        (this layer SwiGLU's stacked gate and up projections). On a GPU, for one row, the kernel takes them all in:
        it sums the norm's statistic as it walks x and multiplies x by the norm's weight on the way, and adds the
        residual or applies SwiGLU to its outputs before they are rounded (quant_kernels, `_finish`), so that a
        decode step's norms, residual adds and SiLU need no kernels of their own (`fuse_gpu_decode`)."""
        rows = x.numel() // x.shape[-1]
        if rows == 1 and x.is_cuda and self.kernel and self.bias is None and x.shape[-1] == self.padded_in_features:
            ends = dict(norm_weight=None if norm is None else norm.weight, eps=0.0 if norm is None else norm.eps,
                        residual=None if residual is None else residual.reshape(1, self.out_features), swiglu=swiglu)
            y = self._kernel(x.reshape(1, x.shape[-1]), **ends)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = self(x if norm is None else norm(x))
        y = silu_mul(y) if swiglu else y
        return y if residual is None else residual + y

    def _native(self, x: Tensor, rows: int) -> bool:
        return self.native and x.dtype == torch.float32 and rows <= cpu_kernels.MAX_ROWS

    def _kernel(self, x: Tensor) -> Tensor:  # x [M, K] -> [M, N]
        raise NotImplementedError

    def pack(self) -> None:
        """On a CPU, take the C++ kernels for a float32 layer where they can be built (cpu_kernels.ops)."""
        self.packed = True
        if self.qweight.device.type == "cpu" and self.scales.dtype == torch.float32:
            self.native = cpu_kernels.ops() is not None


class Int8Linear(QuantizedLinear):
    stored = ("qweight", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))  # [N, K]
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))  # [N]

    @torch.no_grad()
    def load_rows_(self, start: int, dense: Tensor) -> None:
        q, scale = quantize_int8(dense.to(self.qweight.device))
        self.qweight[start:start + len(q)] = q
        self.scales[start:start + len(q)] = scale

    def dequantized(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def _kernel(self, x: Tensor, **ends) -> Tensor:  # (ends: GPU only, `fused`)
        if x.is_cuda:
            from llama.quant_kernels import int8_linear

            return int8_linear(x, self.qweight, self.scales, **ends)
        if self._native(x, len(x)):
            return torch.ops.llamaref_cpu.int8_linear(x.contiguous(), self.qweight, self.scales)
        if torch.compiler.is_compiling():  # Inductor's C++ backend fuses this into one loop over the int8 weights
            return (x[:, None, :] * self.qweight.to(x.dtype)).sum(-1) * self.scales
        return torch._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))


class Int4Linear(QuantizedLinear):
    stored = ("qweight", "scales", "mins")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size
        self.padded_in_features = padded = -(-in_features // group_size) * group_size  # Kp
        self.register_buffer("qweight", torch.empty(out_features, padded // 2, dtype=torch.uint8))  # [N, Kp/2]
        self.register_buffer("scales", torch.empty(out_features, padded // group_size, dtype=dtype))  # [N, Kp/G]
        self.register_buffer("mins", torch.empty(out_features, padded // group_size, dtype=dtype))  # [N, Kp/G]

    @torch.no_grad()
    def load_rows_(self, start: int, dense: Tensor) -> None:
        qweight, scale, low = quantize_int4(dense.to(self.qweight.device), self.group_size)
        rows = slice(start, start + len(qweight))
        self.qweight[rows], self.scales[rows], self.mins[rows] = qweight, scale, low

    def dequantized(self) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins, self.group_size, self.in_features)

    def _kernel(self, x: Tensor, **ends) -> Tensor:  # (ends: GPU only, `fused`)
        if x.shape[-1] != self.padded_in_features:  # the padded inputs meet weights that are not there
            x = F.pad(x, (0, self.padded_in_features - x.shape[-1]))
        if x.is_cuda:
            from llama.quant_kernels import int4_linear

            return int4_linear(x, self.qweight, self.scales, self.mins, self.group_size, **ends)
        if self._native(x, len(x)):
            return torch.ops.llamaref_cpu.int4_linear(x.contiguous(), self.qweight, self.scales, self.mins,
                                                      self.group_size)
        if torch.compiler.is_compiling():
            G = self.group_size
            q = unpack_int4(self.qweight).view(self.out_features, -1, G).to(x.dtype)  # [N, Kp/G, G]
            w = q * self.scales[..., None] + self.mins[..., None]
            return (x.view(x.shape[0], 1, -1, G) * w).sum((-1, -2))
        return torch._weight_int4pack_mm_for_cpu(x, self.cpu_qweight, self.group_size, self.cpu_scales_and_zeros)

    def pack(self) -> None:
        """On a CPU without the C++ kernels: torch's int4 kernel reads its own layout, q - 8 beside a zero point
        (zero = min + 8 * scale), kept beside the stored one (which the prefill dequantizes, and a saved checkpoint
        holds)."""
        super().pack()
        if self.native or hasattr(self, "cpu_qweight") or self.qweight.device.type != "cpu":
            return
        q = unpack_int4(self.qweight).to(torch.int32)  # [N, Kp]
        zeros = (self.mins.float() + 8 * self.scales.float()).to(self.scales.dtype)
        self.register_buffer("cpu_qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("cpu_scales_and_zeros", torch.stack([self.scales, zeros], dim=-1).transpose(0, 1)
                             .contiguous(), persistent=False)  # [Kp/G, N, 2]


# ---------------------------------------------------------------------------- whole models
def quantize_module_tree(model: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> None:
    """Swap the blocks' projections (config.mode) and lm_head (int8) for empty quantized layers, in place; call it
    on a model built on the meta device, before the weights are read."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = module.bias is not None
        if config.mode == "int4" and name != "lm_head":
            layer: QuantizedLinear = Int4Linear(module.in_features, module.out_features, bias, dtype,
                                                config.group_size)
        else:
            layer = Int8Linear(module.in_features, module.out_features, bias, dtype)
        setattr(parent, leaf, layer)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def use_reference(model: nn.Module, enabled: bool = True) -> None:
    """Multiply by the dequantized weights in plain PyTorch (the formula the kernels are tested against)."""
    for layer in quantized_layers(model).values():
        layer.kernel = not enabled


def pack(model: nn.Module) -> None:
    for layer in quantized_layers(model).values():
        layer.pack()


def fuse_cpu_decode(model: nn.Module) -> bool:
    """On a CPU, run each block of a float32 decode step (one token a row, up to cpu_kernels.MAX_ROWS rows) as one
    C++ call, cpu_kernels' decode_layer: the norms, the four quantized products, RoPE, the cache write and the
    attention. The compiled layers spent ~4 ms a step around their products (guards, wrapper code, dispatch) where
    llama.cpp's whole step takes ~7 ms (docs/benchmarks.md, CPU). Every other call (a prefill, a verify step,
    `use_reference`, the reference attention) takes the block's own forward. Applies when every block's products
    are quantized layers that take the C++ kernels and have no hooks (tensor parallelism adds its all-reduce as
    one); returns whether it did."""
    if not fusable(model):
        return False
    for block in model.layers:
        if not hasattr(block.forward, "unfused"):
            block.forward = _fused_decode(block, _products(block), block.forward)
    return True


def fuse_gpu_decode(model: nn.Module) -> bool:
    """On a GPU, a decode step of one token (batch 1): each block's two RMSNorms go into the one-row kernels of
    qkv_proj and gate_up_proj, its SiLU into gate_up_proj's too, and its two residual adds into those of o_proj and
    down_proj (`QuantizedLinear.fused`): 96 kernels fewer a step at 8B, each of them a launch between products,
    and the norms reductions that Inductor tunes anew in each compilation (docs/benchmarks.md). Every other call
    takes the block's own forward. Applies when every block's products are quantized GPU layers without hooks
    (tensor parallelism adds its all-reduce as one); returns whether it did."""
    products = [p for block in model.layers for p in _products(block)]
    if not all(isinstance(p, QuantizedLinear) and p.qweight.is_cuda and not p._forward_hooks for p in products):
        return False
    for block in model.layers:
        if not hasattr(block.forward, "unfused"):
            block.forward = _fused_gpu_decode(block, block.forward)
    return True


def _fused_gpu_decode(block: nn.Module, forward):
    attention, mlp = block.attention, block.mlp

    def decode(x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None, *args) -> Tensor:
        if x.shape[0] * x.shape[1] != 1 or any(arg is not None for arg in args):  # (rows, joining prompts)
            return forward(x, cos, sin, input_pos, mask, *args)
        qkv = attention.qkv_proj.fused(x, norm=block.attention_norm)
        h = attention.o_proj.fused(attention.attend(qkv, cos, sin, input_pos, mask), residual=x)
        return mlp.down_proj.fused(mlp.gate_up_proj.fused(h, norm=block.mlp_norm, swiglu=True), residual=h)

    decode.unfused = forward
    return decode


def fusable(model: nn.Module) -> bool:
    """Whether `fuse_cpu_decode` applies to this model (its quantized layers packed first, as the loader does)."""
    products = [p for block in model.layers for p in _products(block)]
    for p in products:
        if isinstance(p, QuantizedLinear) and not p.packed and p.qweight.device.type == "cpu":
            p.pack()
    return all(isinstance(p, QuantizedLinear) and p.native and p.qweight.device.type == "cpu" and not p._forward_hooks
               and p.scales.dtype == torch.float32 for p in products)


def _products(block: nn.Module) -> tuple[nn.Module, ...]:
    return block.attention.qkv_proj, block.attention.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj


def _fused_decode(block: nn.Module, products: tuple[QuantizedLinear, ...], forward):
    attention = block.attention
    weights = [[p.qweight, p.scales, *([p.mins] if isinstance(p, Int4Linear) else [])] for p in products]
    biases = [p.bias for p in products]
    norms = block.attention_norm.weight, block.mlp_norm.weight

    def decode(x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None, *args) -> Tensor:
        B, T, _ = x.shape
        if (T > 1 or mask is None or any(args) or B > cpu_kernels.MAX_ROWS or x.dtype != torch.float32
                or attention.implementation != "sdpa" or not products[0].kernel):
            return forward(x, cos, sin, input_pos, mask, *args)
        cache = attention.cache
        return torch.ops.llamaref_cpu.decode_layer(x.contiguous(), *norms, block.attention_norm.eps, *weights, biases,
                                                   cos.contiguous(), sin.contiguous(), input_pos, cache.k, cache.v,
                                                   attention.n_heads)

    decode.unfused = forward  # (scripts/cpu_decode.py times both)
    return decode


def held_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model: what it holds on its device."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantizationConfig) -> nn.Module:
    """A quantized copy of a loaded dense Transformer, on its device (the dense model is left as it is): for
    benchmarks and checks that compare the two. Loading a checkpoint with `quantize=` never holds the dense one."""
    from llama.model import Transformer

    weight = model.embed_tokens.weight
    with torch.device("meta"):
        quantized = Transformer(model.config).to(weight.dtype)
        quantize_module_tree(quantized, config, weight.dtype)
    quantized = quantized.to_empty(device=weight.device)
    quantized.rope.reset_parameters()
    for name, param in quantized.named_parameters():  # embeddings, norms, biases
        param.copy_(model.get_parameter(name))
    for name, layer in quantized_layers(quantized).items():
        layer.load_rows_(0, model.get_submodule(name).weight)
    pack(quantized)
    return quantized.eval()
