"""V4's partial, interleaved rotary embedding.

Only the trailing R channels of a head are rotated (heads are laid out [nope | rope]), in interleaved pairs
(2i, 2i+1) that stay in place. V4 keeps two tables: "main" (sliding-window layers) and "compress" (CSA/HCA
layers, their compressors and the indexer; possibly yarn-scaled). Since K = V, attention outputs pick up the
keys' rotation; `apply(..., inverse=True)` undoes it at the query position.

Legend: n = positions, R = rotated dims, R/2 = frequencies.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.models.config import RopeConfig
from moeray.models.layers import rope_inv_freq


class V4Rotary(nn.Module):
    def __init__(self, rope: RopeConfig, rope_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(rope, rope_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [R/2]
        self.rope_dim = rope_dim

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [n] (int) -> cos, sin [n, R/2] (one entry per interleaved pair)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the trailing R channels of x [n, Dh] or [n, H, Dh] by cos/sin [n, R/2]; `inverse` uses -sin."""
        if inverse:
            sin = -sin
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)  # [n, R]
        if x.dim() == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]
        r = cos.shape[-1]
        nope, rope = x[..., :-r], x[..., -r:].float()
        pairs = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        return torch.cat([nope, (rope * cos + pairs * sin).to(x.dtype)], dim=-1)
