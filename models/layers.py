"""Small building blocks shared by every family: RMSNorm, rotary embeddings, the SwiGLU MLP.

Legend: N = tokens, D = hidden size, H = heads, Dh = head dim, R = rotary dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeray.experts.group import mkldnn_packing_available
from moeray.models.config import RopeConfig

LARGE_NORM = 1 << 16  # elements from which a bf16 / fp16 rms_norm takes the two-pass form (see rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2) + eps) * weight, computed in fp32 for bf16 / fp16 inputs.

    float32 and small inputs (decode) take F.rms_norm: one op instead of six. From LARGE_NORM elements in bf16 /
    fp16 (prefill chunks), F.rms_norm's fp32 temporaries outgrow the L2 cache and it runs at a third of the
    speed of this form: one upcast, one vector_norm, one in-place scale (measured on [512, 512] bf16, one thread:
    986 vs 319 us; 2.7x at [4096, 512]). The result is cast to x's dtype before the weight multiplies it, as
    transformers' RMSNorm does."""
    if x.dtype == torch.float32 or x.numel() < LARGE_NORM:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    scale = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    y = xf.mul_(scale).to(x.dtype)
    return y if weight is None else y.mul_(weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scaling factor for a rope type (as transformers computes them)."""
    base = rope.theta
    pos = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (base**pos)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    # yarn
    factor = rope.factor
    orig = rope.original_max_position_embeddings or max_position_embeddings
    attn = rope.attention_factor
    if attn is None:
        if rope.mscale and rope.mscale_all_dim:
            attn = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attn = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    return inv_inter * (1 - extra_factor) + inv_extra * extra_factor, float(attn)


class Rotary(nn.Module):
    """cos/sin tables for positions; `apply` rotates the last dim of q/k (half-split or interleaved pairs)."""

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int, interleave: bool = False) -> None:
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(rope, dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = interleave

        # layers with equal tables share the cos/sin of a batch's positions (models/paged_attention.py)
        self.key = (tuple(inv_freq.tolist()), float(self.scaling), interleave)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, R] (fp32)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, H, R] (or [N, R]) rotated by cos/sin [N, R]; computed in x's dtype (as transformers does)."""
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if x.dim() == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            half = cos.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        return self.apply_signed(x, cos, _signed(sin))

    def signed_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin' [N, 1, R] in `dtype` for `apply_signed` (half-split rotation only): sin'
        carries rotate_half's sign (-sin on the first half), so a step's tables serve every layer without the
        negation of x that rotate_half costs per call."""
        if self.interleave:
            raise ValueError("signed_cos_sin is for half-split rotary; interleaved pairs use apply")
        cos, sin = self.cos_sin(positions)
        return cos.to(dtype)[:, None], _signed(sin).to(dtype)[:, None]

    @staticmethod
    def apply_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Half-split RoPE as x * cos + swap_halves(x) * sin': the same products as x * cos + rotate_half(x) * sin
        (a negation is exact, whichever factor carries it). Swapping the halves is a roll by R / 2: one op
        instead of two slices and a cat (1.5x at decode sizes). cos / sin' broadcast against x [..., R]."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., R] -> sin' with the first half negated (the sign rotate_half puts on x's second half)."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


class PackedLinear(nn.Module):
    """A bf16 nn.Linear on CPU with its weight pre-packed for oneDNN once (the layout its AMX / AVX512-BF16
    kernels read): 1.3-2.5x the plain bf16 linear at 1-64 rows, measured on a Xeon with AMX. The original
    weight stays (state_dict, code that reads `.weight`); the packed copy is what forward uses."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dim() == 2:  # the engine's flattened batch: no reshapes (each is a dispatch at decode sizes)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self._packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU nn.Linear in `model` by a PackedLinear (mutates it) -> how many were replaced."""
    if not mkldnn_packing_available():
        return 0
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
