"""The Llama 2 / Llama 3 network, top-down: tokens in, logits out.

    tokens -> embed -> n_layers x Block -> RMSNorm -> lm_head -> logits
    Block(x):  h   = x + Attention(RMSNorm(x))      grouped-query attention with rotary positions
               out = h + SwiGLU(RMSNorm(h))

Shape legend (used in every comment below):
    B batch, T tokens in this call, S cache length (max_seq_len), L cache slots a decode step reads (L <= S),
    C model width (dim), F SwiGLU width, H query heads, K key/value heads, G = H / K queries per kv head,
    D head dim, V vocab.

Nothing here loads files, samples tokens or parses arguments: see weights.py, generate.py, cli.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.config import ModelConfig


# ---------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight

    No mean subtraction and no bias (unlike LayerNorm). The statistic is computed in float32 whatever the model
    dtype, and the result is cast back before the weight is applied, as in Meta's and transformers' code.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm's formula (the class above) as a function: the quantized one-row GPU kernels take a norm's weight
    and eps in instead of its module (quant_kernels, `QuantizedLinear.fused`)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig, seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """The rotary inverse frequencies inv_freq[i], i = 0 .. D/2-1, in float32, and the cos/sin scale.

    RoPE rotates each pair of query/key features by the angle m * inv_freq[i] at position m, so that
    q_m . k_n depends on m - n only. The base `theta` (rope_theta) sets the slowest rotation:

        inv_freq[i] = theta^(-2i / D)          wavelength_i = 2 pi / inv_freq[i]  (tokens per full turn)

    Llama 2 uses theta = 10,000, Code Llama 1,000,000, Llama 3 500,000: a larger base gives longer wavelengths,
    so distant positions stay distinguishable. Context-extension rules rescale inv_freq:

      linear   inv_freq / factor                                      (position interpolation)
      dynamic  theta' = theta * (factor * L / L0 - (factor - 1))^(D / (D-2)), with L = max(seq_len, L0),
               L0 = max_position_embeddings: unchanged until the sequence outgrows the trained length (NTK)
      llama3   (Llama 3.1/3.2) with L0 = original_max_position_embeddings,
               low_wl = L0 / low_freq_factor, high_wl = L0 / high_freq_factor:
                 wavelength < high_wl   keep inv_freq           (high frequencies: local order, kept exact)
                 wavelength > low_wl    inv_freq / factor       (low frequencies: stretched to the long context)
                 otherwise              (1 - s) * inv_freq / factor + s * inv_freq,
                                        s = (L0 / wavelength - low) / (high - low)
      yarn     a ramp over dimensions between interpolation (inv_freq / factor) and extrapolation (inv_freq),
               plus an attention factor that scales cos and sin (0.1 ln(factor) + 1 by default)
    """
    rope, D = config.rope, config.head_dim
    theta = rope.theta
    exponent = torch.arange(0, D, 2, dtype=torch.int64).float() / D  # 2i / D
    if rope.type == "dynamic":
        L0 = config.max_position_embeddings
        L = torch.clamp(seq_len.float(), min=L0) if seq_len is not None else torch.tensor(float(L0))
        theta = theta * ((rope.factor * L / L0) - (rope.factor - 1)) ** (D / (D - 2))
        exponent = exponent.to(L.device)
    inv_freq = 1.0 / (theta**exponent)

    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        L0, low, high = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        smooth = (L0 / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelength < L0 / high, inv_freq, torch.where(wavelength > L0 / low, inv_freq / rope.factor, blended)
        )
    elif rope.type == "yarn":
        return _yarn_inv_freq(config)
    return inv_freq, 1.0


def _yarn_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023): dimensions that turn more than beta_fast times over the original context keep
    their frequency, those that turn fewer than beta_slow times are interpolated, with a linear ramp between."""
    rope, D = config.rope, config.head_dim
    L0, factor = rope.original_max_position_embeddings, rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def dim_for_rotations(n_rotations: float) -> float:  # the dimension that turns n times over L0 tokens
        return D * math.log(L0 / (n_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_for_rotations(rope.beta_fast), dim_for_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, D, 2).float() / D))
    extrapolate = 1 - ramp  # 1: keep inv_freq, 0: divide by factor
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Turns positions into the cos/sin tables that `apply_rope` needs. Angles are computed in float32 from the
    positions of this call only (B*T*D/2 products), so there is no table to rebuild as the sequence grows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)  # [D/2]
        self.attention_scaling = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Computed, not loaded: call again after the module has been materialised from the meta device."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def frequencies(self, input_pos: Tensor) -> Tensor:
        """inv_freq [D/2] (float32) for a call at these positions."""
        if self.config.rope.type == "dynamic":  # the base depends on how long the sequence has grown
            return rope_inv_freq(self.config, seq_len=input_pos.max() + 1)[0].to(input_pos.device)
        return self.inv_freq.to(input_pos.device)

    def forward(self, input_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = input_pos[..., None].float() * self.frequencies(input_pos)  # [B, T, D/2]: m * inv_freq[i]
        # Hugging Face layout ("rotate half"): feature j pairs with feature j + D/2, both turn by angle j.
        angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_j, x_{j+D/2}) by its angle a:  (x1, x2) -> (x1 cos a - x2 sin a, x2 cos a + x1 sin a).

    x: [B, H or K, T, D]; cos, sin: [B, T, D]. Both outputs are computed from the unrotated x (rotating half the
    pairs in place first and then reading them back is a classic bug that breaks the norm-preserving rotation).
    Meta's original checkpoints pair features (2j, 2j+1) instead; weights.py permutes their q/k rows at load.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated_half * sin.unsqueeze(1)


# ---------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """A static, pre-allocated cache of keys and values: [B_max, K, S, D] each, allocated once by
    `Transformer.setup_cache`. `update` writes the new keys/values at `input_pos` (per row) and returns the
    whole cache for the rows in use; nothing grows or is concatenated while generating. A batch's row b uses cache
    row b, or `rows[b]` when given (a request joining a running batch is prefilled into a free row)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, **factory):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, **factory), persistent=False)  # [B_max, K, S, D]
        self.register_buffer("v", torch.zeros(shape, **factory), persistent=False)  # [B_max, K, S, D]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, K, T, D = k.shape
        assert input_pos.shape == (B, T), f"input_pos {tuple(input_pos.shape)} != (B, T) = {(B, T)}"
        assert B <= self.k.shape[0] and (K, D) == (self.k.shape[1], self.k.shape[3]), "cache shape mismatch"
        index = (torch.arange(B, device=k.device) if rows is None else rows)[:, None]  # [B, 1]
        self.k[index, :, input_pos] = k.transpose(1, 2)  # the indexed view is [B, T, K, D]
        self.v[index, :, input_pos] = v.transpose(1, 2)
        return (self.k[:B], self.v[:B]) if rows is None else (self.k[rows], self.v[rows])


# ---------------------------------------------------------------------------- Linear
class Linear(nn.Linear):
    """y = x W^T + b, W: [out, in]. nn.Linear, but for one row compiled for a CPU the product is written as the
    sum over the input features: Inductor turns that into one vectorised loop that streams W from memory at
    ~26 GB/s on this project's 2-core machine, where torch's matmul (MKL) reads W at ~11 GB/s for one row
    (docs/benchmarks.md, CPU). A decode step reads every weight once, so this sets the CPU's decode speed.

    A speculative verify step on a CPU (a few tokens a row) has a product of its own, `few_rows`, attached from
    outside (speculative.pack_for_verify: oneDNN's matmul with W prepacked, which reads W once for all the rows)."""

    SMALL = 17  # rows (tokens) up to which `few_rows` is used (a verify step of up to 16 proposals)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **factory):
        super().__init__(in_features, out_features, bias, **factory)
        self.few_rows: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if self.few_rows is not None and 1 < rows <= self.SMALL:
            return self.few_rows(x)
        if torch.compiler.is_compiling() and x.device.type == "cpu" and rows == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)  # [..., 1, in] * [out, in] -> [..., out]
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------- Attention
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """PyTorch's fused kernel. Grouped-query attention without copying K/V to every query head
    (`enable_gqa`); `mask=None` means plain causal attention, with no mask tensor built."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The same computation written out, to check the fused kernel against:

        out = softmax(q k^T / sqrt(D) + mask) v,   each query head h reading kv head h // G.

    q: [B, H, T, D]; k, v: [B, K, S, D]; mask: [B, 1, T, S] bool (True = may attend) or None (causal)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.view(B, K, H // K, T, D)  # the G query heads that share a kv head sit together
    scores = q @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(D)  # [B, K, G, T, S]
    if mask is None:  # causal: query t sees keys 0..t (queries are the last T of S keys)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    else:
        mask = mask.unsqueeze(2)  # [B, 1, 1, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v.unsqueeze(2)).view(B, H, T, D)  # [B, K, G, T, D] -> [B, H, T, D]


ATTENTION = {"sdpa": sdpa_attention, "reference": reference_attention}


class Attention(nn.Module):
    """Grouped-query attention with rotary positions. H query heads share K kv heads (G = H / K each)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H, K, D, bias = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        # The q, k and v projections stacked into one [(H + 2K) * D, C] matrix: one matmul instead of three,
        # which matters when decoding one token (the loader fills the three row blocks from q/k/v_proj).
        self.qkv_proj = Linear(C, (H + 2 * K) * D, bias=bias)
        self.qkv_sizes = [H * D, K * D, K * D]
        self.o_proj = Linear(H * D, C, bias=bias)
        self.cache: KVCache | None = None
        self.implementation = "sdpa"
        self.decode_kernel = None  # the compiled GPU path: kernels.decode_attention (RoPE, cache write and SDPA)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None,
                rows: Tensor | None = None, joining: Joining | None = None) -> Tensor:
        qkv = self.qkv_proj(x)  # [B, T, (H + 2K) * D]
        if joining is None:
            return self.o_proj(self.attend(qkv, cos, sin, input_pos, mask, rows))
        # A decode step that prompts join (`Joining`): x is [1, B + n P, C], the decode steps' B tokens first
        B, (n, P) = input_pos.shape[0], joining.tokens.shape
        decoding = self.attend(qkv[0, :B, None], cos, sin, input_pos, mask)  # [B, 1, H * D]
        prompts = self.attend(qkv[0, B:].view(n, P, -1), joining.cos, joining.sin, joining.positions, None,
                              joining.rows)  # [n, P, H * D]
        return self.o_proj(torch.cat([decoding.flatten(0, 1), prompts.flatten(0, 1)])[None])

    def attend(self, qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None,
               rows: Tensor | None = None) -> Tensor:
        """The attention of projected qkv [B, T, (H + 2K) * D] -> [B, T, H * D]."""
        B, T, _ = qkv.shape
        if self.decode_kernel is not None and self.cache is not None and T == 1 and rows is None:
            # The decode step below as one kernel: rotate q and k (their angles computed inside from input_pos),
            # write k and v at input_pos, attend from positions
            out = self.decode_kernel(qkv, self.cache, input_pos)  # [B, H, 1, D]
            return out.transpose(1, 2).reshape(B, T, -1)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        attend = ATTENTION[self.implementation]
        if self.cache is None or mask is None:
            # No cache, or a prefill: the prompt starts at position 0 and its tokens see each other causally.
            if self.cache is not None:
                self.cache.update(input_pos, k, v, rows)
            out = attend(q, k, v, None)  # [B, H, T, D]
        else:
            # A decode or verify step: the new token t of row b (at input_pos[b, t]) sees the cache slots that `mask`
            # allows. The mask covers the first L slots only, those in use; the slots beyond are not read at all.
            k_all, v_all = self.cache.update(input_pos, k, v, rows)  # [B, K, S, D]
            L = mask.shape[-1]
            out = attend(q, k_all[:, :, :L], v_all[:, :, :L], mask)  # [B, H, T, D]
        return out.transpose(1, 2).reshape(B, T, -1)


# ---------------------------------------------------------------------------- SwiGLU MLP
def silu_mul(gate_up: Tensor) -> Tensor:
    """[..., 2F] (gate, then up) -> silu(gate) * up [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """out = down( silu(gate(x)) * up(x) ),  silu(z) = z * sigmoid(z).  C -> F -> C.

    gate and up are stacked into one [2F, C] matrix (one matmul; the loader fills the two row blocks)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_, bias = config.dim, config.ffn_dim, config.mlp_bias
        self.gate_up_proj = Linear(C, 2 * F_, bias=bias)
        self.down_proj = Linear(F_, C, bias=bias)
        self.silu_mul = silu_mul  # the compiled GPU path swaps in kernels.silu_mul: same function, own kernel

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.silu_mul(self.gate_up_proj(x)))  # [B, T, 2F] -> [B, T, F] -> [B, T, C]


# ---------------------------------------------------------------------------- Block and model
class Block(nn.Module):
    """A pre-norm residual block: the residual stream x is only ever added to."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None,
                rows: Tensor | None = None, joining: Joining | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, rows, joining)
        return h + self.mlp(self.mlp_norm(h))


class Joining(NamedTuple):
    """Prompts that join a decode step (continuous batching, scheduler.py): their prefill and the step share one
    pass over the weights. The step's B tokens and the prompts' n P tokens go through every matrix product as one
    stream [1, B + n P, C]; attention alone is apart (the B tokens each at its own position in the cache, each
    prompt causally over itself, written into its cache row)."""

    tokens: Tensor  # [n, P] the prompts, right-padded, from position 0
    rows: Tensor  # [n] the cache rows they are written into
    logits_at: Tensor  # [n] each prompt's last token
    positions: Tensor | None = None  # [n, P]; the forward fills in these three
    cos: Tensor | None = None  # [n, P, D]
    sin: Tensor | None = None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # Llama 3.2 1B/3B: one [V, C] matrix embeds and un-embeds (a quantized lm_head holds its own copy)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, logits_at: Tensor | None = None,
                span: int | None = None, rows: Tensor | None = None, joining: Joining | None = None) -> Tensor:
        """tokens: [B, T] -> logits [B, T, V] (or [B, V] with `logits_at`, or [B + n, V] with `joining`).

        input_pos: None for one full causal forward without a cache. With a cache (`setup_cache`), the positions
          of the tokens, [T] or [B, T]: a call with T > 1 and no `span` is a prefill of prompts that start at
          position 0 (rows may be right-padded; padding never influences earlier tokens), a call with T == 1 a
          decode step in which each row may sit at its own position, and a call with T > 1 and a `span` a verify
          step (speculative.py): each row's T tokens continue what its cache holds, from input_pos[b, 0] on.
        logits_at: [B] index into T per row: compute the output projection only there (a prefill needs the
          logits of each prompt's last token, not a [B, T, V] tensor).
        span: a decode or verify step reads only the first `span` cache slots (at least max(input_pos) + 1), so
          that its cost follows the positions in use rather than the cache allocated; a plain int, known on the
          host (the generation loop counts it), so reading it costs no device synchronisation. None: all S slots.
        rows: [B] the cache rows the batch's rows read and write (prompts prefilled into the free rows of a running
          batch, scheduler.py); None: rows 0..B-1.
        joining: n prompts prefilled within this decode step (T == 1), into free cache rows (`Joining`); the logits
          are then the step's B rows' and, after them, those of each prompt's last token.
        """
        B, T = tokens.shape
        if input_pos is None:
            assert all(layer.attention.cache is None for layer in self.layers), "a cache is set up: pass input_pos"
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            positions = input_pos = input_pos.expand(B, T)  # [B, T]
        mask = None
        cache = self.layers[0].attention.cache
        if cache is not None and (T == 1 or span is not None):
            # A decode or verify step: token t of row b sees cache slots 0..input_pos[b, t], in every layer
            S = cache.k.shape[2]
            slots = torch.arange(S if span is None else min(span, S), device=tokens.device)  # [L]
            mask = (slots <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, T, L]
        x = self.embed_tokens(tokens)  # [B, T, C]
        cos, sin = self.rope(positions, x.dtype)  # [B, T, D] each
        if joining is not None:  # one stream of the step's B tokens, then the prompts' n P: [1, B + n P, C]
            assert T == 1 and rows is None, "prompts join a decode step"
            n, P = joining.tokens.shape
            at = torch.arange(P, device=tokens.device).expand(n, P)  # [n, P]
            joining = joining._replace(positions=at, **dict(zip(("cos", "sin"), self.rope(at, x.dtype))))
            x = torch.cat([x[:, 0], self.embed_tokens(joining.tokens).flatten(0, 1)])[None]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, rows, joining)
        if joining is not None:  # the B tokens, and each prompt's last
            x = torch.cat([x[0, :B], x[0, B + torch.arange(n, device=x.device) * P + joining.logits_at]])  # [B + n, C]
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # [B, C]
        return self.lm_head(self.norm(x))  # [B, T, V] or [B, V]

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache once, for at most `max_batch_size` rows of `max_seq_len` positions."""
        weight = self.embed_tokens.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(
                max_batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim,
                dtype=weight.dtype, device=weight.device,
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def use_triton_kernels(self, enabled: bool = True) -> None:
        """The compiled GPU path: SwiGLU's product gets a Triton kernel of its own, and a decode step's RoPE, cache
        write and attention one flash-decoding kernel when the head dim is a power of two (kernels.py says why);
        the same functions as without them. `set_attention` turns the decode kernel off again."""
        if enabled:
            from llama.kernels import decode_attention
            from llama.kernels import silu_mul as silu_mul_kernel
        D = self.config.head_dim
        attention_kernel = None
        if enabled and D >= 16 and D & (D - 1) == 0:
            attention_kernel = functools.partial(decode_attention, rope=self.rope)
        for layer in self.layers:
            layer.mlp.silu_mul = silu_mul_kernel if enabled else silu_mul
            layer.attention.decode_kernel = attention_kernel

    def set_attention(self, implementation: str) -> None:
        """"sdpa" (fused kernel, default) or "reference" (the same math in plain PyTorch)."""
        if implementation not in ATTENTION:
            raise ValueError(f"attention implementation {implementation!r}: choose from {sorted(ATTENTION)}")
        for layer in self.layers:
            layer.attention.implementation = implementation
            layer.attention.decode_kernel = None
