"""ReferenceModel: the whole model in one process, no Ray. The dense part plus the routed experts split
into any number of expert groups (by default one), composed exactly as the distributed system does.

    m = ReferenceModel.from_pretrained(path)
    logits = m.forward(input_ids)                       # [B, T] -> [B, T, V], causal, fp32
    ids = m.generate(input_ids, max_new_tokens=32)      # [1, T] -> [1, T + 32], greedy, KV cache, no EOS stop
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from moeray.experts.group import ExpertGroup
from moeray.models.checkpoint import Checkpoint, load_dense, load_experts_into, new_expert_group
from moeray.models.config import ModelConfig
from moeray.models.dense import ContiguousCache, SeqChunk
from moeray.models.registry import build_dense_model


def split_slots(cfg: ModelConfig, num_groups: int, how: Literal["round_robin", "blocks"] = "round_robin"
                ) -> list[dict[int, list[int]]]:
    """Assign every (MoE layer, expert) slot to one of `num_groups` groups: group -> layer -> expert ids."""
    if not 1 <= num_groups <= cfg.num_experts:
        raise ValueError(f"num_expert_groups must be in 1..{cfg.num_experts} (the number of experts), got {num_groups}")
    groups: list[dict[int, list[int]]] = [{} for _ in range(num_groups)]
    per = -(-cfg.num_experts // num_groups)
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            g = e % num_groups if how == "round_robin" else min(e // per, num_groups - 1)
            groups[g].setdefault(layer, []).append(e)
    return groups


class ReferenceModel:
    def __init__(self, cfg: ModelConfig, dense: torch.nn.Module, groups: list[ExpertGroup]) -> None:
        self.cfg = cfg
        self.dense = dense.eval()
        self.groups = groups
        # layer -> expert -> group index
        self._owner: dict[int, torch.Tensor] = {}
        for layer in cfg.moe_layers:
            owner = torch.full((cfg.num_experts,), -1, dtype=torch.long)
            for gi, g in enumerate(groups):
                for e in g.slots(layer):
                    owner[e] = gi
            assert bool((owner >= 0).all()), f"layer {layer}: some experts are in no group"
            self._owner[layer] = owner

    @classmethod
    def from_pretrained(cls, path: str | Path, num_expert_groups: int = 1,
                        placement: Literal["round_robin", "blocks"] = "round_robin",
                        expert_quant: str = "none") -> ReferenceModel:
        """Load a Hugging Face folder (config.json + safetensors); experts split into `num_expert_groups`.
        Quantized experts stay packed; `expert_quant` quantizes a bf16/fp32 checkpoint's experts on load."""
        cfg = ModelConfig.from_pretrained(path)
        ckpt = Checkpoint(path, expert_quant)
        dense = build_dense_model(cfg)
        load_dense(dense, cfg, ckpt)
        groups = []
        for slots in split_slots(cfg, num_expert_groups, placement):
            g = new_expert_group(cfg, ckpt)
            load_experts_into(g, cfg, ckpt, slots)
            groups.append(g)
        return cls(cfg, dense, groups)

    # ---- the routed experts, spread over the groups ------------------------------------------------
    def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids/weights [N, K] -> sum of weighted routed expert outputs [N, D]."""
        n, k = ids.shape
        rows = torch.arange(n).repeat_interleave(k)
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        if len(self.groups) == 1:
            return self.groups[0].forward(layer, x, rows, flat_ids, flat_w)
        owner = self._owner[layer][flat_ids]
        out = torch.zeros_like(x, dtype=torch.float32)
        for gi, g in enumerate(self.groups):
            sel = (owner == gi).nonzero().squeeze(1)
            if sel.numel():
                out += g.forward(layer, x, rows[sel], flat_ids[sel], flat_w[sel])
        return out

    # ---- public API ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (equal lengths) -> logits [B, T, V], causal, fp32."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        spec = self.dense.cache_spec()
        seqs = [SeqChunk(t, 0, ContiguousCache(spec)) for _ in range(b)]
        logits = self.dense.forward_tokens(input_ids.reshape(-1), seqs, self.routed)
        return logits.view(b, t, -1)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy decoding with a KV cache, no EOS stop: [1, T] -> [1, T + max_new_tokens]."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"generate takes input_ids of shape [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0].tolist()
        cache = ContiguousCache(self.dense.cache_spec())
        logits = self.dense.forward_tokens(torch.tensor(ids), [SeqChunk(len(ids), 0, cache)], self.routed,
                                           logit_rows=torch.tensor([len(ids) - 1]))
        for step in range(max_new_tokens):
            nxt = int(torch.argmax(logits[-1]))
            ids.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self.dense.forward_tokens(torch.tensor([nxt]), [SeqChunk(1, len(ids) - 1, cache)],
                                                   self.routed)
        return torch.tensor([ids])
