"""The checkpoint's quantization settings (config.json), validated; the formats live in experts/quant_formats.

`quantization_config` {quant_method: fp8, fmt: e4m3, weight_block_size: [bo, bi], activation_scheme: dynamic,
scale_fmt?: ue8m0, expert_dtype?: fp4|fp8} as DeepSeek-V3/V4/V4.1 publish it; `expert_dtype` may also sit at the
top level (V4). The dense projections are FP8 blocks; the routed experts FP8 blocks or MXFP4 (`fp4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from moeray.common.errors import CheckpointError, ConfigError
from moeray.experts.quant_formats import MX_GROUP

ExpertQuant = Literal["none", "int8", "fp8", "mxfp4"]
EXPERT_QUANTS = ("none", "int8", "fp8", "mxfp4")


# ---- the checkpoint's settings ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CheckpointQuant:
    """How a checkpoint stores its weights: `method` None (plain bf16/fp32) or "fp8"; the FP8 block size;
    the routed experts' format ("dense", "fp8" or "mxfp4")."""

    method: Literal["fp8"] | None = None
    block: tuple[int, int] | None = None
    scale_fmt: Literal["float", "ue8m0"] = "float"
    experts: Literal["dense", "fp8", "mxfp4"] = "dense"


def parse_quantization(hf: dict[str, Any]) -> CheckpointQuant:
    """Read `quantization_config` and `expert_dtype` (top level in V4, inside quantization_config in V4.1).
    Anything moeray cannot load exactly -> ConfigError naming the key and the value."""
    qc = hf.get("quantization_config")
    top = hf.get("expert_dtype")
    if qc is None:
        if top is not None:
            raise ConfigError(f"expert_dtype: {top!r} is given but config.json has no quantization_config; "
                              "a quantized checkpoint needs quantization_config.weight_block_size")
        return CheckpointQuant()
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config: expected a mapping, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported (supported: 'fp8', "
                          "DeepSeek's block-scaled FP8 with optional MXFP4 experts)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt: {fmt!r} is not supported (supported: 'e4m3')")
    act = qc.get("activation_scheme", "dynamic")
    if act != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme: {act!r} is not supported (supported: 'dynamic'; "
                          "static activation scales are not applied)")
    block = qc.get("weight_block_size")
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size: {block!r} must be two positive integers "
                          "[rows, cols] (per-tensor FP8 is not supported)")
    scale_fmt = qc.get("scale_fmt") or "float"
    if scale_fmt not in ("float", "ue8m0"):
        raise ConfigError(f"quantization_config.scale_fmt: {scale_fmt!r} is not supported (supported: 'ue8m0', "
                          "or absent for float32 scales)")
    inner = qc.get("expert_dtype")
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"expert_dtype: top level says {top!r} but quantization_config.expert_dtype says "
                          f"{inner!r}; keep one")
    key, ed = ("expert_dtype", top) if top is not None else ("quantization_config.expert_dtype", inner)
    experts = {None: "fp8", "fp8": "fp8", "fp4": "mxfp4"}.get(ed)
    if experts is None:
        raise ConfigError(f"{key}: {ed!r} is not supported (supported: 'fp4' for MXFP4 experts, 'fp8')")
    return CheckpointQuant("fp8", (block[0], block[1]), scale_fmt, experts)


def expected_scale_shape(fmt: str, shape: tuple[int, int], block: tuple[int, int] | None) -> tuple[int, int]:
    """The published scale shape of a weight of `shape` stored as `fmt` ("fp8" or "mxfp4": shape is packed)."""
    o, i = shape
    if fmt == "mxfp4":
        return (o, i * 2 // MX_GROUP)
    assert block is not None
    return (-(-o // block[0]), -(-i // block[1]))


def check_scale(name: str, scale: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(scale.shape) != tuple(expected):
        raise CheckpointError(f"scale tensor {name!r} has shape {tuple(scale.shape)}, expected {tuple(expected)} "
                              "for its weight and the checkpoint's block size")
