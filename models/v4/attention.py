"""DeepSeek-V4 attention: one shared K=V head over a sliding window, plus compressed rows (CSA / HCA).

    q = RMS(W_qb RMSNorm(W_qa x))  per head, unweighted   (low-rank query; the residual also feeds the indexer)
    kv = RMSNorm(W_kv x)           one head, K = V
    keys = window of the last W raw kv rows  (+ compressed rows: all complete ones for HCA, the indexer's
                                               top-k for CSA)
    o = softmax over [q.k / sqrt(Dh), sink_h] without the sink column, times keys; un-rotate o's rope part
    out = W_ob (per-group W_oa o)  (grouped low-rank output projection)

Partial interleaved rope on the trailing channels of every head: "main" table for sliding-window layers,
"compress" for CSA/HCA layers. `forward_batch` projects a flattened batch of many sequences at once; each
sequence then attends over its own `LayerCache` (see models/v4/cache.py). CSA gathers the top-k compressed
rows each query's indexer picked instead of scoring every row and masking.

Legend: n = new tokens, H = heads, Dh = head dim, L = keys (window + compressed rows), g = output groups,
r = o_lora_rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def window_mask(start_pos: int, n: int, key_start: int, key_end: int, window: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [n, L] on `device`: query t sees raw key k iff k <= t and t - k < window."""
    q = torch.arange(start_pos, start_pos + n, device=device)[:, None]
    k = torch.arange(key_start, key_end, device=device)[None, :]
    return (k <= q) & (q - k < window)


class _Projected(NamedTuple):
    """Everything projected once for a flattened batch (N tokens): rope tables, queries, K=V, raw inputs of
    the compressor and the indexer, the indexer's queries and head weights."""

    cos: torch.Tensor
    sin: torch.Tensor
    q: torch.Tensor  # [N, H, Dh]
    kv: torch.Tensor  # [N, Dh]
    comp: torch.Tensor | None  # [N, 2, c*Dh]
    index: torch.Tensor | None  # [N, 2, 2 Di]
    iq: torch.Tensor | None  # [N, Hi, Di]
    iw: torch.Tensor | None  # [N, Hi]


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
        """One sequence's new tokens over its cache."""
        positions = torch.arange(start_pos, start_pos + x.shape[0], device=x.device)
        p = self._project(x, positions)
        out = self._attend(p, slice(0, x.shape[0]), start_pos, cache)
        return self._output(out, p.cos, p.sin)

    def forward_batch(self, x: torch.Tensor, seqs: Sequence[Any], layer_id: int) -> torch.Tensor:
        """The flattened batch of many sequences: x [N, D] -> [N, D]. Every projection (queries, K=V, the
        compressors' and the indexer's inputs, the output) runs once over all N tokens; each sequence then
        writes and reads its own cache and attends over its window plus its compressed rows (CSA: only the
        top-k rows its indexer picked, gathered)."""
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + s.num_tokens, device=x.device)
                               for s in seqs])  # [N]
        p = self._project(x, positions)
        outs, off = [], 0
        for s in seqs:
            outs.append(self._attend(p, slice(off, off + s.num_tokens), s.start_pos, s.cache.layer(layer_id)))
            off += s.num_tokens
        return self._output(torch.cat(outs) if len(outs) > 1 else outs[0], p.cos, p.sin)

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> _Projected:
        n = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions)
        q_res = self.q_a_norm(self.q_a_proj(x))  # [N, Rq]
        q = V4Rotary.apply(rms(self.q_b_proj(q_res).view(n, self.h, self.hd), self.eps), cos, sin)  # [N, H, Dh]
        kv = V4Rotary.apply(self.kv_norm(self.kv_proj(x)), cos, sin)  # [N, Dh]
        comp = self.compressor.project(x) if self.compressor is not None else None
        index = iq = iw = None
        if self.indexer is not None:
            index = self.indexer.project(x)
            iq, iw = self.indexer.queries(x, q_res, positions)
        return _Projected(cos, sin, q, kv, comp, index, iq, iw)

    def _attend(self, p: _Projected, sl: slice, start_pos: int, cache: LayerCache) -> torch.Tensor:
        """One sequence's rows `sl` of the batch: write its cache, attend -> [n, H, Dh] (still rotated)."""
        q = p.q[sl]
        n = q.shape[0]
        end = start_pos + n
        cache.write("kv", start_pos, p.kv[sl])
        lo = max(0, start_pos - self.window + 1)
        keys = cache.read("kv", lo, end).to(q.dtype)  # [Lw, Dh]
        qh = q.transpose(0, 1)  # [H, n, Dh]
        logits = (torch.matmul(qh, keys.t()) * self.scale).masked_fill(
            ~window_mask(start_pos, n, lo, end, self.window, q.device), float("-inf"))  # [H, n, Lw]
        if self.compressor is None:
            return self._sink_mix([logits], [keys])
        rows = self.compressor.update_raw(p.comp[sl], start_pos, cache, "comp")  # [T, Dh]
        if self.indexer is None:  # HCA: every complete compressed row
            seen = visible_rows(start_pos, n, rows.shape[0], self.compressor.rate, q.device)  # [n, T]
            comp = (torch.matmul(qh, rows.t()) * self.scale).masked_fill(~seen, float("-inf"))
            return self._sink_mix([logits, comp], [keys, rows])
        ids, valid = self.indexer.select_ids(p.index[sl], p.iq[sl], p.iw[sl], start_pos, cache)  # [n, k]
        picked = rows[ids]  # [n, k, Dh]: only the rows each query attends to
        comp = (torch.einsum("hnd,nkd->hnk", qh, picked) * self.scale).masked_fill(~valid, float("-inf"))
        return self._sink_mix([logits, comp], [keys, picked])

    def _sink_mix(self, logits: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Softmax over every key group and the per-head sink (which only enlarges the denominator).

        logits: [H, n, L_i] each; values: [L_i, Dh] (shared by the queries) or [n, L_i, Dh] (per query) -> [n, H, Dh].
        """
        h, n = logits[0].shape[0], logits[0].shape[1]
        full = torch.cat([*logits, self.sinks.float()[:, None, None].expand(h, n, 1)], dim=-1)
        full = full - full.max(dim=-1, keepdim=True).values
        probs = torch.softmax(full, dim=-1)[..., :-1].split([lg.shape[-1] for lg in logits], dim=-1)
        out = 0
        for pr, v in zip(probs, values, strict=True):
            out = out + (torch.matmul(pr, v) if v.dim() == 2 else torch.einsum("hnk,nkd->hnd", pr, v))
        return out.transpose(0, 1)

    def _output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[N, H, Dh] attention outputs -> [N, D]: un-rotate at the query position, grouped low-rank output."""
        return self.o_b_proj(self._grouped_o_a(V4Rotary.apply(out, cos, sin, inverse=True)))

    def _grouped_o_a(self, out: torch.Tensor) -> torch.Tensor:
        """[n, H, Dh] -> [n, g * r]: each group of H/g heads projected by its own block of o_a_proj."""
        n = out.shape[0]
        xg = out.reshape(n, self.groups, -1).transpose(0, 1)  # [g, n, H*Dh/g]
        w = self.o_a_proj.weight.view(self.groups, self.o_rank, -1).transpose(1, 2)  # [g, H*Dh/g, r]
        return torch.bmm(xg, w).transpose(0, 1).reshape(n, -1)
