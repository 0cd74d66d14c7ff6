"""Which dense-part class and expert math each family uses."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeray.models.config import ModelConfig
from moeray.models.dense import DenseModel


def build_dense_model(cfg: ModelConfig) -> nn.Module:
    """An uninitialised dense part for `cfg` (fill it with checkpoint.load_dense)."""
    if cfg.model_type == "deepseek_v4":
        from moeray.models.v4.model import V4DenseModel  # noqa: PLC0415 - optional family

        return V4DenseModel(cfg)
    return DenseModel(cfg)


def expert_group_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ExpertGroup for this family's routed experts."""
    return dict(hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size,
                swiglu_limit=cfg.extra.get("swiglu_limit"))
