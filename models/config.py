"""The model configuration moeray needs, read from a Hugging Face `config.json`.

HF configs carry many keys moeray does not use; those are ignored. The keys it uses are validated and
normalised into one `ModelConfig` for every family, so the rest of the code never looks at `model_type`
except where the architecture really differs (attention kind, gate kind, shared experts).
Both the transformers-5 format (`rope_parameters`) and the legacy hub format (`rope_scaling`, `rope_theta`,
DeepSeek's `topk_method` / `scoring_func`) are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moeray.common.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v4")


class RopeConfig(BaseModel):
    """Rotary embedding parameters (transformers' `rope_parameters`, normalised)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    theta: float = Field(10000.0, gt=0)
    type: Literal["default", "linear", "yarn"] = "default"
    factor: float = Field(1.0, gt=0)
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


class ModelConfig(BaseModel):
    """Everything about a model's shape that moeray uses. Build it with `from_hf_dict` / `from_pretrained`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: Literal["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v4"]
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # dense MLP layers
    moe_intermediate_size: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    moe_layers: tuple[int, ...]
    rms_norm_eps: float = Field(1e-6, gt=0)
    max_position_embeddings: int = Field(gt=0)
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # attention
    attention_kind: Literal["gqa", "mla", "v4"] = "gqa"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int, ...] = ()  # per layer: 0 = full attention, w = sliding window of w tokens
    # MLA (DeepSeek-V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # gate
    scoring_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    gate_bias: bool = False  # DeepSeek's e_score_correction_bias
    # shared experts
    shared_intermediate_size: int = 0  # 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid-gated shared expert
    # family-specific extras (DeepSeek-V4 keeps its own validated block here)
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        def bad(field: str, msg: str) -> None:
            raise ValueError(f"{field}: {msg}")

        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"top-k {self.num_experts_per_tok} > number of experts {self.num_experts}")
        if self.num_attention_heads % self.num_key_value_heads and self.attention_kind == "gqa":
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            bad("moe_layers", f"layer ids {list(self.moe_layers)} outside 0..{self.num_hidden_layers - 1}")
        if self.layer_windows and len(self.layer_windows) != self.num_hidden_layers:
            bad("layer_types", f"{len(self.layer_windows)} entries for {self.num_hidden_layers} layers")
        if self.attention_kind == "mla":
            for f in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, f) <= 0:
                    bad(f, "must be > 0 for MLA attention")
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "must be even")
        if self.n_group < 1 or self.num_experts % self.n_group:
            bad("n_group", f"{self.n_group} must divide the number of experts {self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            bad("topk_group", f"{self.topk_group} must be in 1..n_group={self.n_group}")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            bad("n_group", "group-limited routing needs at least 2 experts per group")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            bad("num_experts_per_tok", "top-k exceeds the experts in the selected groups "
                f"({self.topk_group} groups x {self.num_experts // self.n_group})")
        return self

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id in self.moe_layers

    def window(self, layer_id: int) -> int:
        return self.layer_windows[layer_id] if self.layer_windows else 0

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a model folder (or the file itself)."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise ConfigError(f"no config.json at {f}: pass a Hugging Face model folder")
        try:
            hf = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON: {e}") from e
        return cls.from_hf_dict(hf)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face config dict. Raises ConfigError naming the offending field."""
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type: {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            if mt == "deepseek_v4":
                from moeray.models.v4.config import v4_fields  # noqa: PLC0415 - optional family

                fields = v4_fields(hf)
            else:
                fields = _FAMILY_FIELDS[mt](hf)
            return cls(**fields)
        except KeyError as e:
            raise ConfigError(f"{e.args[0]}: required key missing from config.json ({mt})") from None
        except ValueError as e:  # pydantic ValidationError is a ValueError
            raise ConfigError(f"invalid {mt} config: {_pydantic_message(e)}") from None
        except TypeError as e:
            raise ConfigError(f"invalid {mt} config: {e}") from None


def _pydantic_message(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    parts = []
    for err in errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_rope(hf: dict[str, Any]) -> RopeConfig:
    """Accept transformers-5 `rope_parameters` or legacy `rope_scaling` + `rope_theta`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not params and legacy:
        params = dict(legacy)
    if "rope_theta" not in params and "rope_theta" in hf:
        params["rope_theta"] = hf["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn"):
        raise ValueError(f"rope_parameters.rope_type: {rope_type!r} is not supported "
                         "(supported: default, linear, yarn)")
    orig = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and orig is None:
        orig = hf.get("max_position_embeddings")
    return RopeConfig(
        theta=params.get("rope_theta", 10000.0),
        type=rope_type,
        factor=params.get("factor") or 1.0,
        original_max_position_embeddings=orig,
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=params.get("truncate", True),
    )


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    e = hf.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, list) else (int(e),)


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported (only silu)")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    if head_dim is None:
        raise ValueError(f"num_attention_heads: {heads} does not divide hidden_size {hidden} and no head_dim is given")
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope=parse_rope(hf),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
    )


def _num_experts(hf: dict[str, Any], *names: str) -> int:
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    raise KeyError(names[0])


def _qwen_moe_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    step = hf.get("decoder_sparse_step", 1)
    if step < 1:
        raise ValueError(f"decoder_sparse_step: must be >= 1, got {step}")
    only = set(hf.get("mlp_only_layers") or [])
    n = hf["num_hidden_layers"]
    has_experts = _num_experts(hf, "num_experts", "num_local_experts") > 0
    return tuple(i for i in range(n) if i not in only and has_experts and (i + 1) % step == 0)


def _windows(hf: dict[str, Any], all_layers_default: bool) -> tuple[int, ...]:
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") or 0
    types = hf.get("layer_types")
    if types is not None:
        if len(types) != n:
            raise ValueError(f"layer_types: {len(types)} entries for {n} layers")
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if all_layers_default and window:
        return (window,) * n
    return ()


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    f = _common(hf)
    n_exp = _num_experts(hf, "num_local_experts", "num_experts")
    f.update(num_experts=n_exp, moe_intermediate_size=hf["intermediate_size"],
             moe_layers=tuple(range(hf["num_hidden_layers"])), norm_topk_prob=True,
             layer_windows=_windows(hf, all_layers_default=True))
    return f


def _qwen2_moe(hf: dict[str, Any]) -> dict[str, Any]:
    f = _common(hf)
    use_sw = hf.get("use_sliding_window", False)
    hf_sw = dict(hf, sliding_window=hf.get("sliding_window") if use_sw else 0)
    f.update(num_experts=_num_experts(hf, "num_experts", "num_local_experts"),
             moe_intermediate_size=hf["moe_intermediate_size"],
             moe_layers=_qwen_moe_layers(hf), norm_topk_prob=hf.get("norm_topk_prob", False),
             qkv_bias=hf.get("qkv_bias", True), shared_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
             shared_expert_gate=hf.get("shared_expert_intermediate_size", 0) > 0,
             layer_windows=_windows(hf_sw, all_layers_default=False) if use_sw else ())
    return f


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    f = _common(hf)
    use_sw = hf.get("use_sliding_window", False)
    f.update(num_experts=_num_experts(hf, "num_experts", "num_local_experts"),
             moe_intermediate_size=hf["moe_intermediate_size"],
             moe_layers=_qwen_moe_layers(hf), norm_topk_prob=hf.get("norm_topk_prob", False),
             qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False), qk_norm=True,
             layer_windows=_windows(hf, all_layers_default=True) if use_sw else ())
    return f


def _deepseek_v3(hf: dict[str, Any]) -> dict[str, Any]:
    f = _common(hf)
    topk_method = hf.get("topk_method", "noaux_tc")
    if topk_method != "noaux_tc":
        raise ValueError(f"topk_method: {topk_method!r} is not DeepSeek-V3's; deepseek_v3 uses 'noaux_tc'")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"scoring_func: {scoring!r} is not DeepSeek-V3's; deepseek_v3 uses 'sigmoid'")
    n = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    freq = hf.get("moe_layer_freq", 1) or 1
    n_exp = _num_experts(hf, "n_routed_experts", "num_local_experts")
    heads = hf["num_attention_heads"]
    f.update(
        num_key_value_heads=heads,  # MLA: every head has its own K/V expanded from the latent
        head_dim=hf["qk_rope_head_dim"],
        num_experts=n_exp,
        moe_intermediate_size=hf["moe_intermediate_size"],
        moe_layers=tuple(i for i in range(n) if i >= first_dense and i % freq == 0),
        attention_kind="mla",
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_interleave=hf.get("rope_interleave", True),
        scoring_func="sigmoid",
        norm_topk_prob=hf.get("norm_topk_prob", True),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        gate_bias=True,
        shared_intermediate_size=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
    )
    return f


_FAMILY_FIELDS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
}
