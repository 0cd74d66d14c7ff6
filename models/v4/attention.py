"""DeepSeek-V4 attention: one shared K=V head over a sliding window, plus compressed rows (CSA / HCA).

    q = RMS(W_qb RMSNorm(W_qa x))  per head, unweighted   (low-rank query; the residual also feeds the indexer)
    kv = RMSNorm(W_kv x)           one head, K = V
    keys = window of the last W raw kv rows  (+ compressed rows: all complete ones for HCA, the indexer's
                                               top-k for CSA)
    o = softmax over [q.k / sqrt(Dh), sink_h] without the sink column, times keys; un-rotate o's rope part
    out = W_ob (per-group W_oa o)  (grouped low-rank output projection)

Partial interleaved rope on the trailing channels of every head: "main" table for sliding-window layers,
"compress" for CSA/HCA layers. One sequence at a time, over its `LayerCache` (see models/v4/cache.py).

Legend: n = new tokens, H = heads, Dh = head dim, L = keys (window + compressed rows), g = output groups,
r = o_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.kvstore.spec import LayerCacheSpec
from moeray.models.attention import LayerCache
from moeray.models.config import ModelConfig
from moeray.models.layers import RMSNorm
from moeray.models.v4.cache import v4_layer_spec
from moeray.models.v4.compressor import Compressor, visible_rows
from moeray.models.v4.config import CSA, SLIDING, V4Extra
from moeray.models.v4.indexer import Indexer
from moeray.models.v4.rope import V4Rotary


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS norm over the last dim."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def window_mask(start_pos: int, n: int, key_start: int, key_end: int, window: int) -> torch.Tensor:
    """Bool [n, L]: query t sees raw key k iff k <= t and t - k < window."""
    q = torch.arange(start_pos, start_pos + n)[:, None]
    k = torch.arange(key_start, key_end)[None, :]
    return (k <= q) & (q - k < window)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [n, H, Dh], keys [L, Dh] (also the values), mask [n, L] bool, sinks [H] -> [n, H, Dh].

    Each head's sink is an extra logit that only enlarges the softmax denominator.
    """
    n, h = q.shape[0], q.shape[1]
    logits = torch.matmul(q.transpose(0, 1), keys.t()) * scale  # [H, n, L]
    logits = logits.masked_fill(~mask, float("-inf"))
    full = torch.cat([logits, sinks.float()[:, None, None].expand(h, n, 1)], dim=-1)
    full = full - full.max(dim=-1, keepdim=True).values
    probs = torch.softmax(full, dim=-1)[..., :-1]
    return torch.matmul(probs, keys).transpose(0, 1)


class V4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, x: V4Extra, layer_id: int) -> None:
        super().__init__()
        d, h, hd, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
        self.layer_type = x.layer_types[layer_id]
        self.h, self.hd, self.eps, self.window = h, hd, eps, x.sliding_window
        self.groups, self.o_rank = x.o_groups, x.o_lora_rank
        self.scale = hd**-0.5
        self.extra = x
        self.q_a_proj = nn.Linear(d, x.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(x.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(x.q_lora_rank, h * hd, bias=False)
        self.kv_proj = nn.Linear(d, hd, bias=False)
        self.kv_norm = RMSNorm(hd, eps)
        self.o_a_proj = nn.Linear(h * hd // x.o_groups, x.o_groups * x.o_lora_rank, bias=False)  # per group
        self.o_b_proj = nn.Linear(x.o_groups * x.o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        main = self.layer_type == SLIDING
        self.rotary = (V4Rotary(x.main_rope, x.main_rope_dim, cfg.max_position_embeddings) if main
                       else V4Rotary(x.compress_rope, x.compress_rope_dim, cfg.max_position_embeddings))
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if not main:
            rate = x.csa_rate if self.layer_type == CSA else x.hca_rate
            self.compressor = Compressor(d, hd, rate, overlap=self.layer_type == CSA, eps=eps, rotary=self.rotary)
        if self.layer_type == CSA:
            self.indexer = Indexer(d, x.q_lora_rank, x.index_n_heads, x.index_head_dim, x.index_topk, x.csa_rate,
                                   eps, self.rotary)

    def cache_spec(self) -> LayerCacheSpec:
        return v4_layer_spec(self.extra, self.hd, self.layer_type)

    def forward(self, x: torch.Tensor, start_pos: int, cache: LayerCache) -> torch.Tensor:  # [n, D] -> [n, D]
        n = x.shape[0]
        end = start_pos + n
        cos, sin = self.rotary.cos_sin(torch.arange(start_pos, end))
        q_res = self.q_a_norm(self.q_a_proj(x))  # [n, Rq]
        q = V4Rotary.apply(rms(self.q_b_proj(q_res).view(n, self.h, self.hd), self.eps), cos, sin)
        kv = V4Rotary.apply(self.kv_norm(self.kv_proj(x)), cos, sin)  # [n, Dh]
        cache.write("kv", start_pos, kv)
        lo = max(0, start_pos - self.window + 1)
        keys, mask = cache.read("kv", lo, end).to(x.dtype), window_mask(start_pos, n, lo, end, self.window)
        if self.compressor is not None:
            rows = self.compressor.update(x, start_pos, cache, "comp")  # [T, Dh]
            if self.indexer is not None:
                seen = self.indexer.select(x, q_res, start_pos, cache)
            else:
                seen = visible_rows(start_pos, n, rows.shape[0], self.compressor.rate)
            keys, mask = torch.cat([keys, rows]), torch.cat([mask, seen], dim=1)
        out = sink_attention(q, keys, mask, self.sinks, self.scale)  # [n, H, Dh]
        out = V4Rotary.apply(out, cos, sin, inverse=True)
        return self.o_b_proj(self._grouped_o_a(out))

    def _grouped_o_a(self, out: torch.Tensor) -> torch.Tensor:
        """[n, H, Dh] -> [n, g * r]: each group of H/g heads projected by its own block of o_a_proj."""
        n = out.shape[0]
        xg = out.reshape(n, self.groups, -1).transpose(0, 1)  # [g, n, H*Dh/g]
        w = self.o_a_proj.weight.view(self.groups, self.o_rank, -1).transpose(1, 2)  # [g, H*Dh/g, r]
        return torch.bmm(xg, w).transpose(0, 1).reshape(n, -1)
