"""Manifold-constrained hyper-connections: V4's residual is hc parallel streams, mixed around each block.

From the streams a one-layer perceptron (on their RMS-normalised concatenation) gives
    pre  [hc]     = sigmoid(.) + eps        collapses the streams into the block input
    post [hc]     = 2 sigmoid(.)            spreads the block output back over the streams
    comb [hc, hc] = Sinkhorn(softmax(.))    doubly-stochastic mixing of the old streams
and the new streams are  post * block_out + comb^T @ streams.  `HyperHead` collapses the final streams.

Legend: N = tokens, hc = streams, D = hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[N, hc, hc] logits -> near doubly-stochastic [N, hc, hc]: row softmax, then alternating column / row
    normalisation (`iters` column steps in all)."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    def __init__(self, hc: int, hidden: int, iters: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + hc) * hc, hc * hidden))
        self.base = nn.Parameter(torch.zeros((2 + hc) * hc))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [N, hc, D] -> post [N, hc], comb [N, hc, hc], collapsed block input [N, D]."""
        hc = self.hc
        mixes = F.linear(_rms(streams.flatten(1).float(), self.norm_eps), self.fn.float())  # [N, (2+hc)*hc]
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = sinkhorn(comb_w.view(-1, hc, hc) * comb_s + comb_b.view(hc, hc), self.iters, self.hc_eps)
        return post, comb, (pre[..., None] * streams).sum(dim=1)

    @staticmethod
    def mix(streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """New streams [N, hc, D] from the old [N, hc, D], post [N, hc], comb [N, hc, hc] and block output [N, D]."""
        return post[..., None] * out[:, None, :] + torch.matmul(comb.transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """The final collapse of the streams into one hidden state (sigmoid weights, no Sinkhorn)."""

    def __init__(self, hc: int, hidden: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(hc, hc * hidden))
        self.hc_base = nn.Parameter(torch.zeros(hc))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:  # [N, hc, D] -> [N, D]
        mixes = F.linear(_rms(streams.flatten(1).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre[..., None] * streams).sum(dim=1)
