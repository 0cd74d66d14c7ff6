"""The dense part of DeepSeek-V4 (everything but the routed experts), in the DenseModel contract of
models/dense.py. The state between steps is the hyper-connection streams [N, hc, D]:

    attention:  post, comb, h = attn_hc(streams); streams = post * attn(norm(h)) + comb^T streams
    mlp_input:  post, comb, h = ffn_hc(streams); x = norm(h)            -> (x, ctx = (post, comb))
    route/shared on x; routed experts elsewhere (clamped SwiGLU, experts/group.py)
    mlp_output: streams = post * y + comb^T streams
    logits:     lm_head(norm(hc_head(streams)))

Every layer is an MoE layer: `hash_moe` layers choose experts from a frozen token-id table, `moe` layers by
sqrt(softplus) score + bias (router/gate_v4.py). Checkpoint names are DeepSeek's, which is how transformers
5.24 saves V4 (`hf_name`).

Legend: N = tokens in the flattened batch, hc = streams, D = hidden, V = vocab, K = experts per token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kvstore.spec import ModelCacheSpec
from moeray.models.config import ModelConfig
from moeray.models.dense import RoutedFn, SeqChunk, run_model
from moeray.models.layers import RMSNorm
from moeray.models.v4.attention import V4Attention
from moeray.models.v4.config import V4Extra, v4_extra
from moeray.models.v4.hyper import HyperConnection, HyperHead
from moeray.router.gate_v4 import hash_topk, sqrtsoftplus_topk


class V4Gate(nn.Module):
    """A layer's router: weight [E, D] and either the correction bias [E] or the hash table tid2eid [V, K]."""

    def __init__(self, cfg: ModelConfig, is_hash: bool) -> None:
        super().__init__()
        self.k, self.scaling, self.is_hash = cfg.num_experts_per_tok, cfg.routed_scaling_factor, is_hash
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], token_ids [N] -> expert ids [N, K], weights [N, K]."""
        logits = F.linear(x.float(), self.weight.float())
        if self.is_hash:
            return hash_topk(logits, self.tid2eid, token_ids, self.scaling)
        return sqrtsoftplus_topk(logits, self.e_score_correction_bias, self.k, self.scaling)


class ClampedMLP(nn.Module):
    """The shared expert: SwiGLU with gate clamped to <= limit and up to [-limit, limit]."""

    def __init__(self, hidden: int, inter: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


class V4MoE(nn.Module):
    """The dense half of a V4 MoE block: the gate and the shared expert (routed experts live in groups)."""

    def __init__(self, cfg: ModelConfig, x: V4Extra, layer_id: int) -> None:
        super().__init__()
        self.gate = V4Gate(cfg, is_hash=x.mlp_layer_types[layer_id] == "hash_moe")
        self.shared_experts = ClampedMLP(cfg.hidden_size, cfg.shared_intermediate_size, x.swiglu_limit)


class V4DecoderLayer(nn.Module):
    is_moe = True

    def __init__(self, cfg: ModelConfig, x: V4Extra, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = V4Attention(cfg, x, layer_id)
        self.mlp = V4MoE(cfg, x, layer_id)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.attn_hc = HyperConnection(x.hc_mult, d, x.hc_sinkhorn_iters, x.hc_eps, eps)
        self.ffn_hc = HyperConnection(x.hc_mult, d, x.hc_sinkhorn_iters, x.hc_eps, eps)

    def attention(self, state: torch.Tensor, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """state [N, hc, D] -> [N, hc, D]: hyper-connected attention over the whole batch (each sequence's
        cache its own)."""
        post, comb, h = self.attn_hc(state)
        h = self.input_layernorm(h)
        return HyperConnection.mix(state, post, comb, self.self_attn.forward_batch(h, seqs, self.layer_id))

    def mlp_input(self, state: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """state [N, hc, D] -> the MoE input x [N, D] and ctx = (post, comb) for `mlp_output`."""
        post, comb, h = self.ffn_hc(state)
        return self.post_attention_layernorm(h), (post, comb)

    def route(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], token_ids [N] -> expert ids [N, K], weights [N, K]."""
        return self.mlp.gate(x, token_ids)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.shared_experts(x)

    def dense_mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("every DeepSeek-V4 layer is an MoE layer")

    def mlp_output(self, state: torch.Tensor, ctx: Any, y: torch.Tensor) -> torch.Tensor:
        post, comb = ctx
        return HyperConnection.mix(state, post, comb, y)


class V4DenseModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        x = v4_extra(cfg)
        self.cfg, self.hc = cfg, x.hc_mult
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([V4DecoderLayer(cfg, x, i) for i in range(cfg.num_hidden_layers)])
        self.hc_head = HyperHead(x.hc_mult, cfg.hidden_size, x.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def cache_spec(self) -> ModelCacheSpec:
        return ModelCacheSpec(tuple(layer.self_attn.cache_spec() for layer in self.layers))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [N] -> streams [N, hc, D] (the embedding copied into every stream)."""
        e = self.embed_tokens(token_ids).float()
        return e[:, None, :].expand(-1, self.hc, -1).contiguous()

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """streams [N, hc, D] -> logits [N, V] (fp32)."""
        return self.lm_head(self.norm(self.hc_head(state))).float()

    def forward_tokens(self, token_ids: torch.Tensor, seqs: Sequence[SeqChunk], routed: RoutedFn,
                       logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids [N] -> logits [N, V], or only for `logit_rows` [M] -> [M, V]."""
        return run_model(self, token_ids, seqs, routed, logit_rows)

    def hf_name(self, key: str) -> str:
        return v4_checkpoint_name(key, self.cfg.tie_word_embeddings)


# state-dict key (transformers' module names) -> checkpoint name (DeepSeek's, as transformers 5.24 saves V4)
_TOP = {"lm_head.weight": "head.weight"}
_LAYER_RULES = [(re.compile(p), r) for p, r in (
    (r"^input_layernorm\.", "attn_norm."),
    (r"^post_attention_layernorm\.", "ffn_norm."),
    (r"^attn_hc\.(fn|base|scale)$", r"hc_attn_\1"),
    (r"^ffn_hc\.(fn|base|scale)$", r"hc_ffn_\1"),
    (r"^self_attn\.indexer\.q_b_proj\.", "attn.indexer.wq_b."),
    (r"^self_attn\.indexer\.weights_proj\.", "attn.indexer.weights_proj."),
    (r"^self_attn\.indexer\.", "attn.indexer.compressor."),
    (r"^self_attn\.", "attn."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.kv_norm\.", ".norm."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.sinks$", ".attn_sink"),
    (r"\.position_bias$", ".ape"),
    (r"^mlp\.gate\.e_score_correction_bias$", "ffn.gate.bias"),
    (r"^mlp\.shared_experts\.wgate\.", "ffn.shared_experts.w1."),  # gate_proj was renamed to wgate above
    (r"^mlp\.shared_experts\.up_proj\.", "ffn.shared_experts.w3."),
    (r"^mlp\.shared_experts\.down_proj\.", "ffn.shared_experts.w2."),
    (r"^mlp\.", "ffn."),
)]


def v4_checkpoint_name(key: str, tie_word_embeddings: bool = False) -> str:
    """Map a V4DenseModel state-dict key to its checkpoint tensor name."""
    if key == "lm_head.weight" and tie_word_embeddings:
        return "model.embed_tokens.weight"
    if key in _TOP:
        return _TOP[key]
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    if not m:
        return "model." + key
    rest = m.group(2)
    for pat, rep in _LAYER_RULES:
        rest = pat.sub(rep, rest)
    return f"model.layers.{m.group(1)}.{rest}"
