"""The lightning indexer of CSA layers: which compressed rows each query attends to.

score(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . k_s) / sqrt(Di), w = weights_proj(x) / sqrt(Hi); the keys k_s
come from the indexer's own overlapping compressor (models/v4/compressor.py) and q from the query's
low-rank residual, both roped with the compress rope. Each query keeps the `index_topk` best visible rows.

Top-k is canonical: among equal scores the lowest row index wins. The scores are sums of ReLU terms and are
exactly 0 for many rows when few heads are positive, and `torch.topk` breaks such ties differently for
different numbers of rows, which would make a position's output depend on how its sequence was chunked.

Legend: n = queries, Hi = indexer heads, Di = indexer head dim, T = compressed rows, k = index_topk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeray.models.attention import LayerCache
from moeray.models.v4.compressor import Compressor, visible_rows
from moeray.models.v4.rope import V4Rotary


def topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [n, T] -> indices [n, k] of the k largest per row; equal scores rank by lower index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


class Indexer(Compressor):
    def __init__(self, hidden: int, q_lora_rank: int, num_heads: int, head_dim: int, topk: int, rate: int,
                 eps: float, rotary: V4Rotary) -> None:
        super().__init__(hidden, head_dim, rate, overlap=True, eps=eps, rotary=rotary)
        self.num_heads, self.head_dim, self.topk = num_heads, head_dim, topk
        self.q_b_proj = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden, num_heads, bias=False)

    def select(self, x: torch.Tensor, q_residual: torch.Tensor, start_pos: int, cache: LayerCache) -> torch.Tensor:
        """x [n, D], q_residual [n, Rq] -> bool [n, T]: the rows each query attends to (mutates `cache`)."""
        n = x.shape[0]
        keys = self.update(x, start_pos, cache, "index")  # [T, Di]
        t = keys.shape[0]
        visible = visible_rows(start_pos, n, t, self.rate, keys.device)  # [n, T]
        if t == 0:
            return visible
        scores = self.scores(x, q_residual, start_pos, keys).masked_fill(~visible, float("-inf"))
        ids = topk_lowest_index(scores, min(self.topk, t))  # [n, k]
        ids = torch.where(visible.gather(1, ids), ids, t)  # picks past the visible rows go to a dummy column
        chosen = torch.zeros(n, t + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
        return chosen[:, :t]

    def select_ids(self, raw_new: torch.Tensor, q: torch.Tensor, w: torch.Tensor, start_pos: int,
                   cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k rows of each query as indices, for gathering (mutates `cache`).

        raw_new [n, 2, 2 Di] (`project(x)`), q [n, Hi, Di] roped indexer queries, w [n, Hi] head weights (see
        `queries`) -> ids [n, k] (into the compressed rows), valid [n, k] bool (False: fewer than k rows are
        visible to that query). The same rows `select` marks, in canonical order.
        """
        n = q.shape[0]
        keys = self.update_raw(raw_new, start_pos, cache, "index")  # [T, Di]
        t = keys.shape[0]
        visible = visible_rows(start_pos, n, t, self.rate, keys.device)  # [n, T]
        if t == 0:
            return (torch.zeros(n, 0, dtype=torch.long, device=keys.device),
                    torch.zeros(n, 0, dtype=torch.bool, device=keys.device))
        s = F.relu(torch.matmul(q.float(), keys.float().t())) * self.head_dim**-0.5  # [n, Hi, T]
        scores = (s * w[..., None]).sum(dim=1).masked_fill(~visible, float("-inf"))
        ids = topk_lowest_index(scores, min(self.topk, t))  # [n, k]
        return ids, visible.gather(1, ids)

    def queries(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], q_residual [N, Rq], positions [N] -> roped queries [N, Hi, Di], head weights [N, Hi] (fp32)."""
        n = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions)
        q = V4Rotary.apply(self.q_b_proj(q_residual).view(n, self.num_heads, self.head_dim), cos, sin)
        return q, self.weights_proj(x).float() * self.num_heads**-0.5

    def scores(self, x: torch.Tensor, q_residual: torch.Tensor, start_pos: int, keys: torch.Tensor) -> torch.Tensor:
        """Index scores [n, T] (fp32) of the queries at start_pos.. against the compressed keys [T, Di]."""
        n = x.shape[0]
        cos, sin = self.rotary.cos_sin(torch.arange(start_pos, start_pos + n, device=x.device))
        q = V4Rotary.apply(self.q_b_proj(q_residual).view(n, self.num_heads, self.head_dim), cos, sin)
        s = F.relu(torch.matmul(q.float(), keys.float().t())) * self.head_dim**-0.5  # [n, Hi, T]
        w = self.weights_proj(x).float() * self.num_heads**-0.5  # [n, Hi]
        return (s * w[..., None]).sum(dim=1)
