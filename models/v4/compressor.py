"""V4's KV compressor: every complete window of m tokens becomes one compressed row.

Row w = RMSNorm(sum_j softmax_j(gate_j + position_bias_j) * kv_j) over the window's tokens j (softmax per
channel), roped at position w * m with the compress rope. HCA pools its own m tokens. CSA (and its indexer)
uses overlapping windows: the projections have two halves, Ca (first) and Cb (second), and row w pools
window w-1's Ca slots together with window w's Cb slots (2m slots; window 0 has no predecessor, whose slots
get weight 0). A query at position t sees rows w < (t + 1) // m, i.e. only complete windows.

The raw projections are cached per token (`<name>_raw`), so the rows completed by a chunk are recomputed
from the cache whatever the chunking; see models/v4/cache.py.

Legend: n = new tokens, L = raw tokens pooled, m = compress rate, c = 2 with overlap else 1,
d = row dim, T = compressed rows so far.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.models.attention import LayerCache
from moeray.models.layers import RMSNorm
from moeray.models.v4.rope import V4Rotary


def pool_windows(kv: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, m: int, overlap: bool,
                 has_prev: bool) -> torch.Tensor:
    """Softmax-gated pooling of whole windows (before the norm and the rope).

    kv, gate [L, c*d] raw projections, bias [m, c*d]. Without overlap L = nw * m. With overlap the first
    window given is the predecessor of the first pooled one when `has_prev` (L = (nw + 1) * m), else the
    first pooled window is window 0 of the sequence (L = nw * m). Returns [nw, d] (fp32).
    """
    cd = kv.shape[-1]
    k = kv.float().view(-1, m, cd)
    g = gate.float().view(-1, m, cd) + bias.float()
    if not overlap:
        return (k * g.softmax(dim=1)).sum(dim=1)
    d = cd // 2
    cur_k, cur_g = k[int(has_prev):, :, d:], g[int(has_prev):, :, d:]  # Cb of the pooled windows
    prev_k, prev_g = k[:-1, :, :d], g[:-1, :, :d]  # Ca of their predecessors
    if not has_prev:
        prev_k = torch.cat([k.new_zeros(1, m, d), prev_k])
        prev_g = torch.cat([g.new_full((1, m, d), float("-inf")), prev_g])
    kk, gg = torch.cat([prev_k, cur_k], dim=1), torch.cat([prev_g, cur_g], dim=1)  # [nw, 2m, d]
    return (kk * gg.softmax(dim=1)).sum(dim=1)


class Compressor(nn.Module):
    """Projections, position bias and norm of one compressed series (CSA/HCA rows, or the indexer's keys)."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float, rotary: V4Rotary) -> None:
        super().__init__()
        c = 2 if overlap else 1
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.kv_proj = nn.Linear(hidden, c * dim, bias=False)
        self.gate_proj = nn.Linear(hidden, c * dim, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, c * dim))
        self.kv_norm = RMSNorm(dim, eps)
        self.rotary = rotary

    def update(self, x: torch.Tensor, start_pos: int, cache: LayerCache, name: str) -> torch.Tensor:
        """Cache the new tokens' projections, pool the windows they complete, return every row so far.

        x [n, D] (the attention input) at positions start_pos.. -> rows [T, d], T = (start_pos + n) // m.
        Writes `<name>_raw` rows start_pos.. and `<name>` rows for the completed windows (mutates `cache`).
        """
        return self.update_raw(self.project(x), start_pos, cache, name)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, D] -> the raw per-token projections [n, 2, c*d] (row 0 kv, row 1 gate logits)."""
        return torch.stack([self.kv_proj(x), self.gate_proj(x)], dim=1)

    def update_raw(self, raw_new: torch.Tensor, start_pos: int, cache: LayerCache, name: str) -> torch.Tensor:
        """`update` with the new tokens' projections [n, 2, c*d] already computed -> rows [T, d]."""
        n, m = raw_new.shape[0], self.rate
        end = start_pos + n
        cache.write(f"{name}_raw", start_pos, raw_new)
        w0, w1 = start_pos // m, end // m  # the windows completed by this chunk
        if w1 > w0:
            has_prev = self.overlap and w0 > 0
            raw = cache.read(f"{name}_raw", (w0 - int(has_prev)) * m, w1 * m)  # [L, 2, c*d]
            rows = self.kv_norm(pool_windows(raw[:, 0], raw[:, 1], self.position_bias, m, self.overlap, has_prev))
            cos, sin = self.rotary.cos_sin(torch.arange(w0, w1, device=raw.device) * m)
            cache.write(name, w0, V4Rotary.apply(rows, cos, sin))
        if w1 == 0:
            return raw_new.new_zeros(0, self.dim)
        return cache.read(name, 0, w1).to(raw_new.dtype)


def visible_rows(start_pos: int, n: int, num_rows: int, rate: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [n, T] on `device`: query start_pos + i sees compressed row w iff its window is complete
    (w < (t+1) // m)."""
    limit = (torch.arange(start_pos, start_pos + n, device=device) + 1) // rate
    return torch.arange(num_rows, device=device)[None, :] < limit[:, None]
