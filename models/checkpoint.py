"""Hugging Face safetensors checkpoints: the one place that knows the checkpoint's tensor names.

Single file (`model.safetensors`) or sharded (`model.safetensors.index.json`), memory-mapped; each part
loads only the tensors it needs (an expert group only its own experts). Weights may be stored in bf16;
they are upcast to the compute dtype (fp32 on CPU: bf16 matmul there is ~400x slower).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeray.common.errors import CheckpointError
from moeray.models.config import ModelConfig


class Checkpoint:
    """Index of a safetensors checkpoint folder; tensors are read lazily (mmap) by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / f for k, f in weight_map.items()}
        elif single.exists():
            with safe_open(str(single), "pt") as f:
                self._file_of = {k: single for k in f.keys()}
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            if not file.exists():
                raise CheckpointError(f"checkpoint shard {file} named in the index is missing")
            h = safe_open(str(file), "pt")
            self._handles[file] = h
        return h

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` as `dtype`; raises CheckpointError with the name and expected shape on a mismatch."""
        file = self._file_of.get(name)
        if file is None:
            exp = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise CheckpointError(f"tensor {name!r}{exp} is missing from the checkpoint at {self.path}")
        t = self._handle(file).get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(dtype)


def hf_dense_name(cfg: ModelConfig, key: str) -> str:
    """Map a DenseModel state-dict key to the checkpoint name (GQA/MLA families)."""
    if key == "lm_head.weight":
        return "model.embed_tokens.weight" if cfg.tie_word_embeddings else key
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    if not m:
        return "model." + key
    i, rest = m.group(1), m.group(2)
    moe = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    if rest.startswith("gate."):
        return f"model.layers.{i}.{moe}.{rest}"
    if rest.startswith("shared_expert_gate."):
        return f"model.layers.{i}.mlp.{rest}"
    if rest.startswith("shared_expert."):
        sub = "shared_experts" if cfg.model_type == "deepseek_v3" else "shared_expert"
        return f"model.layers.{i}.mlp.{sub}." + rest.removeprefix("shared_expert.")
    return f"model.layers.{i}.{rest}"


def load_dense(model: nn.Module, cfg: ModelConfig, ckpt: Checkpoint) -> None:
    """Fill every parameter and persistent buffer of a dense model from the checkpoint (fp32)."""
    name_of = getattr(model, "hf_name", None) or (lambda key: hf_dense_name(cfg, key))
    state = {}
    for key, t in model.state_dict().items():
        state[key] = ckpt.get(name_of(key), tuple(t.shape), dtype=t.dtype)
    model.load_state_dict(state, strict=True)


def expert_names(cfg: ModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """Per-expert checkpoint names (gate, up, down) for a family."""
    if cfg.model_type == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    if cfg.model_type == "deepseek_v4":  # DeepSeek's own names, which transformers 5.24 saves V4 in
        p = f"model.layers.{layer}.ffn.experts.{expert}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def load_expert_weights(cfg: ModelConfig, ckpt: Checkpoint, slots: dict[int, list[int]],
                        dtype: torch.dtype = torch.float32) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Load only the listed (layer -> expert ids) slots: layer -> expert -> (gate_up [2I, D], down [D, I]).

    Accepts per-expert tensors (hub and transformers' saved format) and transformers' fused 3-D tensors
    (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]).
    """
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    out: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, experts in slots.items():
        if not cfg.is_moe_layer(layer):
            raise CheckpointError(f"layer {layer} is not an MoE layer (MoE layers: {list(cfg.moe_layers)})")
        bad = [e for e in experts if not 0 <= e < cfg.num_experts]
        if bad:
            raise CheckpointError(f"layer {layer}: expert ids {bad} outside 0..{cfg.num_experts - 1}")
        fused = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        layer_out = {}
        for e in experts:
            if fused in ckpt:
                gu = _fused_slice(ckpt, fused, e, (cfg.num_experts, 2 * inter, d), dtype)
                dn = _fused_slice(ckpt, f"model.layers.{layer}.mlp.experts.down_proj", e,
                                  (cfg.num_experts, d, inter), dtype)
            else:
                g, u, dn_name = expert_names(cfg, layer, e)
                gu = torch.cat([ckpt.get(g, (inter, d), dtype), ckpt.get(u, (inter, d), dtype)])
                dn = ckpt.get(dn_name, (d, inter), dtype)
            layer_out[e] = (gu, dn)
        out[layer] = layer_out
    return out


def _fused_slice(ckpt: Checkpoint, name: str, e: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    file = ckpt._file_of.get(name)
    if file is None:
        raise CheckpointError(f"tensor {name!r} (expected shape {shape}) is missing from the checkpoint")
    sl = ckpt._handle(file).get_slice(name)
    if tuple(sl.get_shape()) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(sl.get_shape())}, expected {shape}")
    return sl[e].to(dtype)
