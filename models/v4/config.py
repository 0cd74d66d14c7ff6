"""DeepSeek-V4's configuration: the common ModelConfig fields plus a validated `extra` block (`V4Extra`).

Reads transformers-5.24 `config.json` files (nested `rope_parameters = {"main": ..., "compress": ...}`) and the
legacy keys `DeepseekV4Config.__post_init__` folds in (`compress_ratios`, `compress_rate_csa/hca`,
`num_hash_layers`, `qk_rope_head_dim`, flat `rope_parameters` / `rope_scaling`), with transformers' defaults.
V4 has one shared KV head whatever `num_key_value_heads` says, and every layer is an MoE layer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moeray.models.config import ModelConfig, RopeConfig

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_TYPES = ("hash_moe", "moe")
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


class V4Extra(BaseModel):
    """The V4-only shape of the model (ModelConfig.extra). Rope dims are the rotated trailing channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer_types: tuple[Literal["sliding_attention", "compressed_sparse_attention",
                               "heavily_compressed_attention"], ...]
    mlp_layer_types: tuple[Literal["hash_moe", "moe"], ...]
    csa_rate: int = Field(gt=0)  # m: tokens pooled per CSA compressed row (overlapping windows of 2m)
    hca_rate: int = Field(gt=0)  # m': tokens pooled per HCA compressed row
    sliding_window: int = Field(gt=0)
    q_lora_rank: int = Field(gt=0)
    o_groups: int = Field(gt=0)
    o_lora_rank: int = Field(gt=0)
    index_n_heads: int = Field(gt=0)
    index_head_dim: int = Field(gt=0)
    index_topk: int = Field(gt=0)
    hc_mult: int = Field(gt=0)
    hc_sinkhorn_iters: int = Field(gt=0)
    hc_eps: float = Field(ge=0)
    swiglu_limit: float = Field(gt=0)
    main_rope: RopeConfig  # sliding-window layers
    main_rope_dim: int = Field(gt=0)
    compress_rope: RopeConfig  # CSA / HCA layers, their compressors and the indexer
    compress_rope_dim: int = Field(gt=0)


def v4_extra(cfg: ModelConfig) -> V4Extra:
    """The validated V4 block of a deepseek_v4 ModelConfig."""
    return V4Extra.model_validate(cfg.extra)


def v4_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields for a deepseek_v4 `config.json` dict. Raises ValueError("field: message")."""
    n = hf["num_hidden_layers"]
    heads, head_dim, hidden = hf["num_attention_heads"], hf["head_dim"], hf["hidden_size"]
    _check_supported(hf)
    main, compress = _ropes(hf, head_dim)
    main_dim, compress_dim = _rope_dim(main, head_dim, "main"), _rope_dim(compress, head_dim, "compress")
    rates = _compress_rates(hf)
    extra = V4Extra(
        layer_types=_layer_types(hf, n),
        mlp_layer_types=_mlp_layer_types(hf, n),
        csa_rate=rates[CSA],
        hca_rate=rates[HCA],
        sliding_window=hf.get("sliding_window", 128),
        q_lora_rank=hf.get("q_lora_rank", 1024),
        o_groups=hf.get("o_groups", 8),
        o_lora_rank=hf.get("o_lora_rank", 1024),
        index_n_heads=hf.get("index_n_heads", 64),
        index_head_dim=hf.get("index_head_dim", 128),
        index_topk=hf.get("index_topk", 512),
        hc_mult=hf.get("hc_mult", 4),
        hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
        hc_eps=hf.get("hc_eps", 1e-6),
        swiglu_limit=hf.get("swiglu_limit", 10.0),
        main_rope=_rope_config(main), main_rope_dim=main_dim,
        compress_rope=_rope_config(compress), compress_rope_dim=compress_dim,
    )
    _check_shapes(extra, heads, head_dim)
    moe_inter = hf["moe_intermediate_size"]
    return dict(
        model_type="deepseek_v4",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=1,  # shared K=V latent, one head (transformers ignores the key too)
        head_dim=head_dim,
        intermediate_size=moe_inter,  # the shared expert's width (transformers maps it to this key)
        moe_intermediate_size=moe_inter,
        num_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf.get("num_experts_per_tok", 6),
        moe_layers=tuple(range(n)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 1048576),
        rope=extra.main_rope,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
        attention_kind="v4",
        layer_windows=(extra.sliding_window,) * n,
        q_lora_rank=extra.q_lora_rank,
        qk_rope_head_dim=main_dim,
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.5),
        gate_bias=True,
        shared_intermediate_size=moe_inter,
        extra=extra.model_dump(),
    )


# ---- pieces -------------------------------------------------------------------------------------------
def _check_supported(hf: dict[str, Any]) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise ValueError(f"scoring_func: {hf['scoring_func']!r} is not supported for deepseek_v4 (only sqrtsoftplus)")
    if hf.get("n_shared_experts", 1) != 1:
        raise ValueError(f"n_shared_experts: {hf['n_shared_experts']} is not supported; V4 has exactly 1 shared expert")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias: true is not supported for deepseek_v4 (the shared expert has no biases)")
    if hf.get("swiglu_limit", 10.0) <= 0:
        raise ValueError(f"swiglu_limit: must be > 0, got {hf['swiglu_limit']} (transformers clamps to it "
                         "unconditionally, so 0 would zero every expert)")
    if hf.get("q_lora_rank", 1024) in (None, 0):
        raise ValueError("q_lora_rank: must be > 0; V4's query is always low-rank")


def _check_shapes(x: V4Extra, heads: int, head_dim: int) -> None:
    if heads % x.o_groups:
        raise ValueError(f"o_groups: {x.o_groups} does not divide num_attention_heads {heads}")
    if x.compress_rope_dim > x.index_head_dim and CSA in x.layer_types:
        raise ValueError(f"index_head_dim: {x.index_head_dim} is smaller than the rope dim {x.compress_rope_dim} "
                         "the indexer rotates")


def _compress_rates(hf: dict[str, Any]) -> dict[str, int]:
    rates = {CSA: 4, HCA: 128}
    given = hf.get("compress_rates") or {}
    unknown = set(given) - {CSA, HCA}
    if unknown:
        raise ValueError(f"compress_rates: unknown keys {sorted(unknown)}; expected {CSA!r} and {HCA!r}")
    rates.update(given)
    if hf.get("compress_rate_csa") is not None:
        rates[CSA] = hf["compress_rate_csa"]
    if hf.get("compress_rate_hca") is not None:
        rates[HCA] = hf["compress_rate_hca"]
    for k, v in rates.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"compress_rates.{k}: must be a positive integer, got {v!r}")
    return rates


def _layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        ratios = hf["compress_ratios"]
        bad = [r for r in ratios if r not in _RATIO_TO_TYPE]
        if bad:
            raise ValueError(f"compress_ratios: values {bad} are not 0, 4 or 128; give layer_types instead")
        types = [_RATIO_TO_TYPE[r] for r in ratios]
    if types is None:  # transformers' default: 2 HCA layers, then HCA / CSA interleaved
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    types = list(types)[:n]
    if len(types) != n:
        raise ValueError(f"layer_types: {len(types)} entries for {n} layers")
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise ValueError(f"layer_types: {bad} are not V4 layer types {list(LAYER_TYPES)}")
    return tuple(types)


def _mlp_layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    types = hf.get("mlp_layer_types")
    if types is None:
        n_hash = hf.get("num_hash_layers")
        n_hash = 3 if n_hash is None else n_hash
        types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    types = list(types)[:n]
    if len(types) != n:
        raise ValueError(f"mlp_layer_types: {len(types)} entries for {n} layers")
    bad = [t for t in types if t not in MLP_TYPES]
    if bad:
        raise ValueError(f"mlp_layer_types: {bad} are not V4 MLP layer types {list(MLP_TYPES)}")
    return tuple(types)


def _ropes(hf: dict[str, Any], head_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (main, compress) rope dicts exactly as DeepseekV4Config.__post_init__ builds them."""
    factor = hf.get("partial_rotary_factor")
    if factor is None:
        legacy = hf.get("qk_rope_head_dim")
        factor = legacy / head_dim if legacy is not None else 64 / 512
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", 10000.0)
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = dict(rp["main"]), dict(rp["compress"])
        for d in (main, compress):  # transformers' standardize_rope_params fills these
            d.setdefault("rope_type", d.get("type", "default"))
            d.setdefault("rope_theta", theta)
            d.setdefault("partial_rotary_factor", factor)
        return main, compress
    yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
    main = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}
    compress = {**yarn, "rope_theta": hf.get("compress_rope_theta", 160000.0), "partial_rotary_factor": factor}
    compress.setdefault("rope_type", compress.pop("type", "default"))
    if compress["rope_type"] == "yarn":  # the V4 reference never scales cos/sin by YaRN's mscale
        compress.setdefault("attention_factor", 1.0)
        compress.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 1048576))
    return main, compress


def _rope_config(d: dict[str, Any]) -> RopeConfig:
    kind = d.get("rope_type", "default")
    if kind not in ("default", "linear", "yarn"):
        raise ValueError(f"rope_parameters.rope_type: {kind!r} is not supported (supported: default, linear, yarn)")
    return RopeConfig(
        theta=d["rope_theta"], type=kind, factor=d.get("factor") or 1.0,
        original_max_position_embeddings=d.get("original_max_position_embeddings"),
        beta_fast=d.get("beta_fast"), beta_slow=d.get("beta_slow"), mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"), attention_factor=d.get("attention_factor"),
        truncate=True,  # transformers reads `truncate` from the top level of V4's nested dict: always True
    )


def _rope_dim(d: dict[str, Any], head_dim: int, label: str) -> int:
    dim = int(head_dim * d.get("partial_rotary_factor", 1.0))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(f"rope_parameters.{label}.partial_rotary_factor: gives a rope dim of {dim}; it must be "
                         f"even and in 2..head_dim={head_dim}")
    return dim


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    e = hf.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, list) else (int(e),)
