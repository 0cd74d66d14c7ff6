"""Hugging Face safetensors checkpoints: the one place that knows the checkpoint's tensor names and formats.

Single file (`model.safetensors`) or sharded (`model.safetensors.index.json`), memory-mapped; each part
loads only the tensors it needs (an expert group only its own experts). Plain weights (bf16/fp32) are cast to
the dtype asked for. Quantized weights follow config.json's `quantization_config` (models/quant.py):
- dense parts: FP8 block-scaled projections are dequantized on load (code x scale, in float32, then cast);
- routed experts: `load_expert_weights` dequantizes too (any caller gets correct weights), while
  `new_expert_group` + `load_experts_into` keep them packed as stored (FP8 blocks, MXFP4) or quantize a
  bf16/fp32 checkpoint's experts on load (`expert_quant`: int8, fp8, mxfp4).
DeepSeek-V4 hub names are mapped to transformers' saved names (models/v4/names.py); multi-token-prediction
weights (`mtp.*`, `model.layers.<n>` past num_hidden_layers) are skipped with one log line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from moeray.common.errors import CheckpointError, ConfigError
from moeray.experts.group import ExpertGroup
from moeray.experts.quant_formats import (
    MX_GROUP,
    dequant_fp8_blocks,
    dequant_mxfp4,
    quantize_fp8_blocks,
    quantize_int8_rows,
    quantize_mxfp4,
)
from moeray.experts.quantized import PackedExpert, PackedExpertGroup, PackedWeight
from moeray.models.config import ModelConfig
from moeray.models.quant import EXPERT_QUANTS, CheckpointQuant, check_scale, expected_scale_shape, parse_quantization
from moeray.models.registry import expert_group_kwargs
from moeray.models.v4.names import canonical_v4_name, uses_hub_names

log = logging.getLogger("moeray.checkpoint")
ON_LOAD_FP8_BLOCK = (128, 128)  # the block moeray uses when it quantizes a bf16/fp32 checkpoint's experts to fp8
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_SCALE_SUFFIX = "_scale_inv"


def is_mtp(name: str, num_hidden_layers: int | None) -> bool:
    """Multi-token-prediction weights: `mtp.*`, or `model.layers.<n>` past num_hidden_layers (V3's layout)."""
    if name.startswith(("mtp.", "model.mtp.")):
        return True
    m = _LAYER.match(name)
    return bool(m and num_hidden_layers is not None and int(m.group(1)) >= num_hidden_layers)


class Checkpoint:
    """Index of a safetensors checkpoint folder; tensors are read lazily (mmap) by canonical name.

    `expert_quant` ("none", "int8", "fp8", "mxfp4") quantizes a bf16/fp32 checkpoint's routed experts on load.
    """

    def __init__(self, path: str | Path, expert_quant: str = "none") -> None:
        self.path = Path(path)
        stored = self._stored_names()
        hf = self._hf_config()
        self.quant: CheckpointQuant = parse_quantization(hf)
        self.expert_quant = self._check_expert_quant(expert_quant)
        n_layers = hf.get("num_hidden_layers")
        mtp = [n for n in stored if is_mtp(n, n_layers)]
        if mtp:
            log.info("checkpoint %s: skipping %d multi-token-prediction tensors (mtp.*, layers >= %s)",
                     self.path, len(mtp), n_layers)
        v4 = hf.get("model_type") == "deepseek_v4"
        names = set(stored)
        if v4 and uses_hub_names(list(stored)):
            log.info("checkpoint %s: DeepSeek-V4 hub names, mapped to transformers' names", self.path)
        # canonical name -> (file, stored name)
        self._file_of = {(canonical_v4_name(n, names) if v4 else n): (f, n)
                         for n, f in stored.items() if not is_mtp(n, n_layers)}
        self._handles: dict[Path, Any] = {}

    def _stored_names(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.path / f for k, f in weight_map.items()}
        if single.exists():
            with safe_open(str(single), "pt") as f:
                return {k: single for k in f.keys()}
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}")

    def _hf_config(self) -> dict[str, Any]:
        f = self.path / "config.json"
        try:
            return json.loads(f.read_text()) if f.exists() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON: {e}") from e

    def _check_expert_quant(self, expert_quant: str) -> str:
        if expert_quant not in EXPERT_QUANTS:
            raise ConfigError(f"expert_quant: {expert_quant!r} is not one of {', '.join(EXPERT_QUANTS)}")
        if expert_quant != "none" and self.quant.experts != "dense":
            raise ConfigError(f"expert_quant: {expert_quant!r} quantizes bf16/fp32 checkpoints on load, but the "
                              f"experts of {self.path} are stored as {self.quant.experts} already; set expert_quant: "
                              "none (they are served packed as stored)")
        return expert_quant

    # ---- names ---------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    @property
    def expert_format(self) -> str:
        """How routed experts are held when served: "dense", or packed "fp8" / "mxfp4" / "int8"."""
        return self.expert_quant if self.expert_quant != "none" else self.quant.experts

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            if not file.exists():
                raise CheckpointError(f"checkpoint shard {file} named in the index is missing")
            h = safe_open(str(file), "pt")
            self._handles[file] = h
        return h

    def _missing(self, name: str, shape: tuple[int, ...] | None) -> CheckpointError:
        exp = f" (expected shape {tuple(shape)})" if shape is not None else ""
        return CheckpointError(f"tensor {name!r}{exp} is missing from the checkpoint at {self.path}")

    def raw(self, name: str) -> torch.Tensor:
        """Tensor `name` exactly as stored (dtype and shape)."""
        entry = self._file_of.get(name)
        if entry is None:
            raise self._missing(name, None)
        file, stored = entry
        return self._handle(file).get_tensor(stored)

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype of `name` as stored ("F8_E4M3", "I8", "BF16", ...)."""
        file, stored = self._file_of[name]
        return self._handle(file).get_slice(stored).get_dtype()

    # ---- reading ---------------------------------------------------------------------------------------
    def get(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` as `dtype`, dequantized if stored quantized; CheckpointError naming the tensor (and the
        expected shape) when it is missing or mis-shaped, or when its scale is."""
        if name not in self._file_of:
            raise self._missing(name, shape)
        packed = self.packed(name)
        if packed is None:
            t = self.raw(name)
        elif packed[0] == "fp8":
            t = dequant_fp8_blocks(packed[1].codes, packed[1].scale, self.quant.block)
        else:
            t = dequant_mxfp4(packed[1].codes, packed[1].scale)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(dtype)

    def packed(self, name: str) -> tuple[str, PackedWeight] | None:
        """(format, codes + scale) of a quantized tensor as stored, None for a plain one. The scale's shape is
        checked against the weight's and the block size (CheckpointError naming the scale tensor)."""
        dt = self.stored_dtype(name)
        scale_name = name + _SCALE_SUFFIX
        if dt not in ("F8_E4M3", "I8"):
            return None
        if dt == "I8" and scale_name not in self._file_of:
            return None  # a genuine int8 tensor (no published format stores int8 without a scale)
        if self.quant.method is None:
            raise ConfigError(f"tensor {name!r} is stored as {dt} but config.json has no quantization_config: "
                              "add DeepSeek's quantization_config (quant_method fp8, weight_block_size)")
        if scale_name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is stored as {dt} but its scale {scale_name!r} is missing")
        codes, scale = self.raw(name), self.raw(scale_name)
        fmt = "fp8" if dt == "F8_E4M3" else "mxfp4"
        if codes.dim() != 2:
            raise CheckpointError(f"tensor {name!r}: quantized tensors must be 2-D, got shape {tuple(codes.shape)}")
        check_scale(scale_name, scale, expected_scale_shape(fmt, tuple(codes.shape), self.quant.block))
        return fmt, PackedWeight(codes, scale)


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
    """Fill every parameter and persistent buffer of a dense model from the checkpoint, in each one's dtype
    (FP8 projections dequantized on load)."""
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


def _check_slots(cfg: ModelConfig, layer: int, experts: list[int]) -> None:
    if not cfg.is_moe_layer(layer):
        raise CheckpointError(f"layer {layer} is not an MoE layer (MoE layers: {list(cfg.moe_layers)})")
    bad = [e for e in experts if not 0 <= e < cfg.num_experts]
    if bad:
        raise CheckpointError(f"layer {layer}: expert ids {bad} outside 0..{cfg.num_experts - 1}")


def load_expert_weights(cfg: ModelConfig, ckpt: Checkpoint, slots: dict[int, list[int]],
                        dtype: torch.dtype = torch.float32) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Load only the listed (layer -> expert ids) slots: layer -> expert -> (gate_up [2I, D], down [D, I]),
    dequantized if stored quantized.

    Accepts per-expert tensors (hub and transformers' saved format) and transformers' fused 3-D tensors
    (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]).
    """
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    out: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, experts in slots.items():
        _check_slots(cfg, layer, experts)
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


def load_packed_experts(cfg: ModelConfig, ckpt: Checkpoint, slots: dict[int, list[int]]
                        ) -> dict[int, dict[int, PackedExpert]]:
    """layer -> expert -> PackedExpert in `ckpt.expert_format`: the stored codes and scales of a quantized
    checkpoint, or a bf16/fp32 checkpoint's experts quantized on load (`expert_quant`)."""
    fmt = ckpt.expert_format
    if fmt == "dense":
        raise CheckpointError(f"{ckpt.path}: the routed experts are stored unquantized; load them with "
                              "load_expert_weights, or set expert_quant to quantize them on load")
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if ckpt.expert_quant == "mxfp4" and (d % MX_GROUP or inter % MX_GROUP):
        raise ConfigError(f"expert_quant: 'mxfp4' needs hidden_size ({d}) and moe_intermediate_size ({inter}) to be "
                          f"multiples of {MX_GROUP} (one scale per {MX_GROUP} inputs); use int8 or fp8")
    out: dict[int, dict[int, PackedExpert]] = {}
    for layer, experts in slots.items():
        _check_slots(cfg, layer, experts)
        if ckpt.expert_quant == "none" and f"model.layers.{layer}.mlp.experts.gate_up_proj" in ckpt:
            raise CheckpointError(f"{ckpt.path}: quantized experts in transformers' fused 3-D layout "
                                  "(mlp.experts.gate_up_proj) are not supported; use per-expert tensors")
        layer_out = {}
        for e in experts:
            names = expert_names(cfg, layer, e)
            shapes = ((inter, d), (inter, d), (d, inter))
            if ckpt.expert_quant != "none":
                gu, dn = load_expert_weights(cfg, ckpt, {layer: [e]})[layer][e]
                ws = [quantize_weight(w, fmt) for w in (gu[:inter], gu[inter:], dn)]
            else:
                ws = [_stored_packed(ckpt, n, s, fmt) for n, s in zip(names, shapes)]
            layer_out[e] = PackedExpert(*ws)
        out[layer] = layer_out
    return out


def _stored_packed(ckpt: Checkpoint, name: str, shape: tuple[int, int], fmt: str) -> PackedWeight:
    if name not in ckpt:
        raise ckpt._missing(name, shape)
    got = ckpt.packed(name)
    if got is None or got[0] != fmt:
        raise CheckpointError(f"tensor {name!r}: the config says routed experts are {fmt}, but it is stored as "
                              f"{ckpt.stored_dtype(name)}{'' if got is None else ' ' + got[0]}")
    w = got[1]
    want = (shape[0], shape[1] // 2) if fmt == "mxfp4" else shape
    if tuple(w.codes.shape) != want:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.codes.shape)}, expected {want} ({fmt})")
    return w


def quantize_weight(w: torch.Tensor, fmt: str) -> PackedWeight:
    """[O, I] float -> packed in `fmt` ("int8" rows, "fp8" ON_LOAD_FP8_BLOCK blocks, "mxfp4")."""
    if fmt == "int8":
        return PackedWeight(*quantize_int8_rows(w))
    if fmt == "fp8":
        return PackedWeight(*quantize_fp8_blocks(w, ON_LOAD_FP8_BLOCK))
    return PackedWeight(*quantize_mxfp4(w))


def new_expert_group(cfg: ModelConfig, ckpt: Checkpoint, **kwargs: Any) -> ExpertGroup | PackedExpertGroup:
    """An empty expert group for this checkpoint: ExpertGroup for plain experts, PackedExpertGroup holding them
    packed otherwise. `kwargs` go to the group (dtype, device)."""
    fmt = ckpt.expert_format
    if fmt == "dense":
        return ExpertGroup(**expert_group_kwargs(cfg), **kwargs)
    block = ON_LOAD_FP8_BLOCK if ckpt.expert_quant == "fp8" else ckpt.quant.block
    return PackedExpertGroup(**expert_group_kwargs(cfg), **kwargs, fmt=fmt, block=block)


def load_experts_into(group: ExpertGroup | PackedExpertGroup, cfg: ModelConfig, ckpt: Checkpoint,
                      slots: dict[int, list[int]]) -> None:
    """Load (layer -> expert ids) from the checkpoint into a group made by `new_expert_group`."""
    if isinstance(group, PackedExpertGroup):
        loaded = load_packed_experts(cfg, ckpt, slots)
    else:
        loaded = load_expert_weights(cfg, ckpt, slots)
    for layer, experts in loaded.items():
        group.load(layer, experts)


def _fused_slice(ckpt: Checkpoint, name: str, e: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    entry = ckpt._file_of.get(name)
    if entry is None:
        raise CheckpointError(f"tensor {name!r} (expected shape {shape}) is missing from the checkpoint")
    file, stored = entry
    sl = ckpt._handle(file).get_slice(stored)
    if tuple(sl.get_shape()) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(sl.get_shape())}, expected {shape}")
    if sl.get_dtype() in ("F8_E4M3", "I8"):
        raise CheckpointError(f"tensor {name!r}: FP8 experts in transformers' fused 3-D layout are not supported; "
                              "use per-expert tensors")
    return sl[e].to(dtype)
