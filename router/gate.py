"""Gate functions: from router logits to each token's top-k experts and their weights. Pure torch.

Legend: N = tokens, E = experts, K = experts per token, G = expert groups (DeepSeek's n_group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE: softmax over all experts, keep the top k, optionally renormalise to sum 1.

    logits [N, E] -> ids [N, K] (long), weights [N, K] (fp32). Ties go to the lower expert id (torch.topk).
    """
    probs = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 (noaux_tc): sigmoid scores; choice uses score + correction bias, restricted to the
    `topk_group` groups with the highest sum of their two best biased scores; weights are the unbiased
    scores of the chosen experts, optionally renormalised, times `scaling`.

    logits [N, E], bias [E] -> ids [N, K], weights [N, K].
    """
    n, e = logits.shape
    scores = logits.float().sigmoid()  # [N, E]
    choice = scores + bias.float()
    if n_group > 1:
        group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
        group_ids = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)
        expert_mask = group_mask[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


class Gate(nn.Module):
    """A layer's router: weight [E, D] (+ DeepSeek's correction bias) and the family's selection rule."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        k: int,
        scoring: str = "softmax",
        renormalize: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        scaling: float = 1.0,
        with_bias: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        if with_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None
        self.k, self.scoring, self.renormalize = k, scoring, renormalize
        self.n_group, self.topk_group, self.scaling = n_group, topk_group, scaling

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] (post-attention-norm hidden) -> ids [N, K], weights [N, K]. token_ids unused here."""
        # in fp32 whatever the serving dtype (bf16 serving keeps the gate weight fp32: a bf16 gate flips near-ties);
        # a .float() of an fp32 tensor is skipped, not dispatched
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), w)  # [N, E]
        if self.scoring == "softmax":
            return softmax_topk(logits, self.k, self.renormalize)
        assert self.e_score_correction_bias is not None
        return grouped_sigmoid_topk(logits, self.e_score_correction_bias, self.k, self.n_group,
                                    self.topk_group, self.renormalize, self.scaling)
