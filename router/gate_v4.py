"""DeepSeek-V4 gate functions, pure torch: sqrt(softplus) scores, biased top-k choice and hash routing.

Both rules weight the chosen experts by their *unbiased* scores, renormalised to sum 1 and scaled by
`routed_scaling_factor` (V4 always renormalises, whatever `norm_topk_prob` says). They differ only in which
experts are chosen: the top k of score + correction bias, or a frozen token-id -> expert-ids table
(`hash_moe` layers, the first few layers of V4).

Legend: N = tokens, E = experts, K = experts per token, V = vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    """V4's expert scores: sqrt(softplus(logits)), in fp32. [N, E] -> [N, E]."""
    return F.softplus(logits.float()).sqrt()


def _weights(scores: torch.Tensor, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    w = scores.gather(1, ids)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scaling


def sqrtsoftplus_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-routed layers: choose the top k of sqrtsoftplus(logits) + bias; weights from the unbiased scores.

    logits [N, E], bias [E] -> ids [N, K] (long), weights [N, K] (fp32, each row sums to `scaling`).
    """
    scores = sqrtsoftplus(logits)
    ids = torch.topk(scores + bias.float(), k, dim=-1, sorted=False).indices
    return ids, _weights(scores, ids, scaling)


def hash_topk(logits: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor, scaling: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash-routed layers: the experts are `tid2eid[token_ids]`; weights as in `sqrtsoftplus_topk`.

    logits [N, E], tid2eid [V, K], token_ids [N] -> ids [N, K] (long), weights [N, K].
    """
    if token_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"hash routing needs one token id per row: {token_ids.shape[0]} ids for "
                         f"{logits.shape[0]} rows")
    ids = tid2eid[token_ids].long()
    return ids, _weights(sqrtsoftplus(logits), ids, scaling)
