"""The dense part of a model: everything except the routed experts.

A decoder layer is used in steps so that the routed experts can run elsewhere (another actor, another
device) between them:

    state = layer.attention(state, seqs)            # pre-norm attention + residual, per sequence
    x, ctx = layer.mlp_input(state)                 # post-attention norm (V4: hyper-connection pre-mix)
    if layer.is_moe:
        ids, w = layer.route(x, token_ids)          # the gate
        y = routed(x, ids, w) + layer.shared(x)     # routed experts from the expert groups
    else:
        y = layer.dense_mlp(x)
    state = layer.mlp_output(state, ctx, y)         # residual (V4: post-mix)

`state` is opaque to callers ([N, D] here; V4 keeps several residual streams). The ragged batch of many
sequences is flattened: `seqs` lists, in order, each sequence's number of new tokens, its first position
and its cache.

Legend: N = tokens in the flattened batch, D = hidden, V = vocab, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeray.kvstore.spec import ModelCacheSpec
from moeray.models.attention import LayerCache, build_attention
from moeray.models.config import ModelConfig
from moeray.models.layers import MLP, RMSNorm, pack_linears
from moeray.router.gate import Gate


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections that read the same input (GQA's q/k/v, MLA's q_a/kv_a) into one linear each, in every
    attention module that supports it (mutates the model) -> how many modules were fused. Serving only: the
    ReferenceModel keeps the checkpoint's modules."""
    mods = [m for m in model.modules() if hasattr(m, "fuse_projections") and m is not model]
    for m in mods:
        m.fuse_projections()
    return len(mods)


def cast_dense(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """Prepare a dense part for serving (mutates it): fused projections (fuse_projections) in every dtype, and
    parameters held in `dtype` except the routers' (buffers such as rotary frequencies stay fp32). With `device`,
    parameters and buffers move there, each parameter cast on its way (the device never holds an fp32 copy of a
    bf16 model). Raises ValueError for a family that only runs in float32."""
    if dtype != torch.float32 and not getattr(model, "reduced_precision", False):
        raise ValueError(f"{type(model).__name__} runs in float32 only: set dtype: float32")
    fuse_projections(model)
    if dtype == torch.float32 and device is None:
        return model
    # the router stays fp32 (a few KB per layer): the gate logits decide which experts run, and a bf16-rounded
    # gate weight flips near-tied choices against the fp32 reference
    routers = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=None if id(p) in routers else dtype)
    if device is not None:
        model.to(device)  # the buffers (parameters are there already)
    if dtype == torch.bfloat16:
        pack_linears(model)  # oneDNN's pre-packed bf16 GEMMs (models/layers.py)
    return model


class SeqBatch(list):
    """The SeqChunks of one flattened batch, plus what attention computes once per step for all layers
    (`meta`: positions, cache rows, masks; see models/paged_attention.py). A plain list works too (slower)."""

    __slots__ = ("meta",)

    def __init__(self, chunks=()) -> None:
        super().__init__(chunks)
        self.meta = None


@dataclass(slots=True)
class SeqChunk:
    """One sequence's slice of a flattened batch: `num_tokens` new tokens starting at position `start_pos`."""

    num_tokens: int
    start_pos: int
    cache: Any  # ModelCache-like: .layer(layer_id) -> LayerCache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg, layer_id)
        if self.is_moe:
            self.gate = Gate(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.scoring_func,
                             cfg.norm_topk_prob, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                             with_bias=cfg.gate_bias)
            self.shared_expert = (MLP(cfg.hidden_size, cfg.shared_intermediate_size)
                                  if cfg.shared_intermediate_size else None)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def attention(self, state: torch.Tensor, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """state [N, D] -> [N, D]: pre-norm attention over each sequence's cache, plus the residual."""
        h = self.input_layernorm(state)
        batch = getattr(self.self_attn, "forward_batch", None)
        if batch is not None:
            return state + batch(h, seqs, self.layer_id)
        outs, off = [], 0
        for s in seqs:
            outs.append(self.self_attn(h[off:off + s.num_tokens], s.start_pos, s.cache.layer(self.layer_id)))
            off += s.num_tokens
        return state + (torch.cat(outs) if len(outs) > 1 else outs[0])

    def mlp_input(self, state: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.post_attention_layernorm(state), None

    def route(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> expert ids [N, K], weights [N, K]."""
        return self.gate(x, token_ids)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        y = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y

    def dense_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def mlp_output(self, state: torch.Tensor, ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return state + y


# routed(layer_id, x [N, D], ids [N, K], weights [N, K]) -> [N, D]
RoutedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DenseModel(nn.Module):
    """Embeddings, decoder layers without their routed experts, final norm and LM head."""

    reduced_precision = True  # runs in bfloat16 / float16 too (see cast_dense)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def cache_spec(self) -> ModelCacheSpec:
        return ModelCacheSpec(tuple(layer.self_attn.cache_spec() for layer in self.layers))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [N] -> initial state [N, D], in the weights' dtype."""
        return self.embed_tokens(token_ids)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """state [N, D] -> logits [N, V] (fp32)."""
        return self.lm_head(self.norm(state)).float()

    def forward_tokens(self, token_ids: torch.Tensor, seqs: Sequence[SeqChunk], routed: RoutedFn,
                       logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run the flattened batch through every layer, the routed experts through `routed`.

        token_ids [N] -> logits [N, V], or only for `logit_rows` [M] -> [M, V].
        """
        return run_model(self, token_ids, seqs, routed, logit_rows)


def run_model(model: nn.Module, token_ids: torch.Tensor, seqs: Sequence[SeqChunk], routed: RoutedFn,
              logit_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Any dense part (embed, layers, logits): the flattened batch through every layer -> logits."""
    state = model.embed(token_ids)
    seqs = seqs if isinstance(seqs, SeqBatch) else SeqBatch(seqs)
    for layer in model.layers:
        state = run_layer(layer, state, token_ids, seqs, routed)
    if logit_rows is not None:
        state = state[logit_rows]
    return model.logits(state)


def run_layer(layer: nn.Module, state: torch.Tensor, token_ids: torch.Tensor, seqs: Sequence[SeqChunk],
              routed: RoutedFn) -> torch.Tensor:
    """One decoder layer: attention, then the MLP part with the routed experts computed by `routed`."""
    state = layer.attention(state, seqs)
    x, ctx = layer.mlp_input(state)
    if layer.is_moe:
        ids, w = layer.route(x, token_ids)
        y = routed(layer.layer_id, x, ids, w)
        sh = layer.shared(x)
        if sh is not None:
            y = y + sh
    else:
        y = layer.dense_mlp(x)
    return layer.mlp_output(state, ctx, y)


class ContiguousCache:
    """A single sequence's cache in growing contiguous tensors (ReferenceModel, tests)."""

    def __init__(self, spec: ModelCacheSpec) -> None:
        self.spec = spec
        self._layers = [_ContiguousLayer() for _ in spec.layers]

    def layer(self, layer_id: int) -> LayerCache:
        return self._layers[layer_id]


class _ContiguousLayer:
    def __init__(self) -> None:
        self.t: dict[str, torch.Tensor] = {}

    def write(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        cur = self.t.get(name)
        if cur is None:
            cur = rows.new_zeros((0, *rows.shape[1:]))
        if cur.shape[0] < start_row:
            raise AssertionError(f"cache gap writing {name} at row {start_row} (have {cur.shape[0]})")
        self.t[name] = torch.cat([cur[:start_row], rows.detach()])

    def read(self, name: str, start_row: int, end_row: int) -> torch.Tensor:
        return self.t[name][start_row:end_row]
