"""Serving DeepSeek from the hub files: bytes of V3, V4-Flash and V4-Pro as published, computed from their configs.

    python -m moeray.bench.hub_sizes [--out bench/results/hub_sizes.json]

The configs below are the published config.json values that decide sizes (rope parameters omitted: they change
no shape). Every tensor shape comes from moeray's own model definition built from the config with its
parameters on the `meta` device (accelerate's init_empty_weights: no memory), the routed experts from
(layers x experts x 3 projections); each tensor is then priced in its published format:
- V3: attention/MLP projections float8_e4m3fn + a float32 scale per 128x128 block (`weight_scale_inv`); the rest
  bf16 (the router bias: fp32);
- V4: attention wq_a/wq_b/wkv/wo_a/wo_b, indexer wq_b, shared expert in FP8 with e8m0 scales per 128x128 block;
  routed experts MXFP4 (4.25 bits per weight: a nibble + an e8m0 byte per 32); hash tables int64; the rest bf16.
Multi-token-prediction weights are excluded (moeray skips them). Per expert actor: the routed experts split
evenly, held packed (as in the checkpoint). The gating actor holds the dense part dequantized in bf16.
KV cache bytes per token: moeray's cache spec (kvstore/spec.py, via the dense model's `cache_spec()`) at 2 bytes
per element; for V4 also averaged over a 64K-token context with sliding-window rows capped at the window.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "max_position_embeddings": 163840,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}
_V4_COMMON = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "o_lora_rank": 1024, "sliding_window": 128, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "num_hash_layers": 3, "n_shared_experts": 1, "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus",
    "swiglu_limit": 10.0, "index_n_heads": 64, "index_head_dim": 128, "max_position_embeddings": 1048576,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}
V4_FLASH = {**_V4_COMMON, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
            "q_lora_rank": 1024, "o_groups": 8, "n_routed_experts": 256, "moe_intermediate_size": 2048,
            "index_topk": 512, "routed_scaling_factor": 1.5,
            # two sliding-window layers, then CSA (4) / HCA (128) alternating; the trailing 0 is the MTP layer
            "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)] + [0]}
V4_PRO = {**_V4_COMMON, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
          "q_lora_rank": 1536, "o_groups": 16, "n_routed_experts": 384, "moe_intermediate_size": 3072,
          "index_topk": 1024, "routed_scaling_factor": 2.5,
          "compress_ratios": [128, 128] + [4 if i % 2 == 0 else 128 for i in range(59)] + [0]}
MODELS = {"DeepSeek-V3": V3, "DeepSeek-V4-Flash": V4_FLASH, "DeepSeek-V4-Pro": V4_PRO}
ACTOR_COUNTS = (8, 16, 32, 64)
CONTEXT = 65536

_V3_FP8 = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_proj)|"
                     r"mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_experts\.\w+)\.weight$")
_V4_FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123])\.weight$")


def _empty_model(cfg) -> torch.nn.Module:
    """The dense part with its parameters on the `meta` device (no memory; buffers such as rope tables real)."""
    from accelerate import init_empty_weights

    from moeray.models.registry import build_dense_model

    with init_empty_weights(include_buffers=False):
        return build_dense_model(cfg)


def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> int:
    return -(-shape[0] // block[0]) * -(-shape[1] // block[1])


def dense_bytes(hf: dict[str, Any]) -> dict[str, float]:
    """Published bytes of every tensor but the routed experts, its parameter count, and the same in bf16."""
    from moeray.models.checkpoint import hf_dense_name
    from moeray.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(hf)
    dense = _empty_model(cfg)
    name_of = getattr(dense, "hf_name", None) or (lambda key: hf_dense_name(cfg, key))
    block = tuple(hf["quantization_config"]["weight_block_size"])
    v4 = cfg.model_type == "deepseek_v4"
    scale_bytes = 1 if hf["quantization_config"].get("scale_fmt") == "ue8m0" else 4
    published = params = 0
    for key, t in dense.state_dict().items():
        name, n = name_of(key), t.numel()
        params += n
        if (_V4_FP8 if v4 else _V3_FP8).search(name):
            published += n + _blocks(tuple(t.shape), block) * scale_bytes
        elif not t.is_floating_point():
            published += n * t.element_size()  # V4's tid2eid hash tables: int64 on the hub too
        else:
            published += n * 2
    return {"published_bytes": published, "params": params, "bf16_bytes": 2 * params}


def expert_bytes(hf: dict[str, Any]) -> dict[str, float]:
    """Published bytes of one routed expert (3 projections of I x D), and the number of (layer, expert) slots."""
    from moeray.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(hf)
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    block = tuple(hf["quantization_config"]["weight_block_size"])
    if hf.get("expert_dtype") == "fp4":
        one = 3 * (i * d // 2 + i * d // 32)  # nibbles + an e8m0 scale per 32 inputs
    else:
        scale_bytes = 1 if hf["quantization_config"].get("scale_fmt") == "ue8m0" else 4
        one = 2 * (i * d + _blocks((i, d), block) * scale_bytes) + (d * i + _blocks((d, i), block) * scale_bytes)
    return {"per_expert_bytes": one, "slots": cfg.num_moe_layers * cfg.num_experts, "num_experts": cfg.num_experts,
            "bf16_per_expert_bytes": 3 * i * d * 2}


def cache_bytes(hf: dict[str, Any], context: int = CONTEXT) -> dict[str, float]:
    """KV cache bytes per token from moeray's cache spec at 2 bytes per element: the spec's own figure, and the
    average over `context` tokens with sliding-window tensors capped at their window."""
    from moeray.models.config import ModelConfig

    spec = _empty_model(ModelConfig.from_hf_dict(hf)).cache_spec()
    capped = 0.0
    for layer in spec.layers:
        for t in layer.tensors:
            tokens = min(context, t.window) if t.window else context
            capped += -(-tokens // t.tokens_per_row) * t.row_numel() * 2
    return {"spec_bytes_per_token": spec.bytes_per_token(itemsize=2), f"bytes_per_token_at_{context}": capped / context}


def table(models: dict[str, dict[str, Any]] = MODELS) -> dict[str, Any]:
    rows = {}
    for name, hf in models.items():
        dn, ex, kv = dense_bytes(hf), expert_bytes(hf), cache_bytes(hf)
        experts_total = ex["per_expert_bytes"] * ex["slots"]
        rows[name] = {
            "total_published_bytes": dn["published_bytes"] + experts_total,
            "dense_published_bytes": dn["published_bytes"], "gating_actor_bf16_bytes": dn["bf16_bytes"],
            "routed_expert_bytes": experts_total, "per_expert_bytes": ex["per_expert_bytes"],
            "per_expert_actor_bytes": {n: experts_total / n for n in ACTOR_COUNTS if ex["num_experts"] % n == 0},
            "per_expert_actor_bf16_bytes": {n: ex["bf16_per_expert_bytes"] * ex["slots"] / n for n in ACTOR_COUNTS},
            **kv,
        }
    return rows


def format_table(rows: dict[str, Any]) -> str:
    gib = 2**30
    head = ("| model | published weights (no MTP) | routed experts | dense (gating actor, bf16) | "
            + " | ".join(f"per expert actor, {n} actors" for n in ACTOR_COUNTS)
            + " | KV bytes/token (spec) | KV bytes/token at 64K |")
    lines = [head, "|" + "---|" * (6 + len(ACTOR_COUNTS))]
    for name, r in rows.items():
        per = " | ".join(f"{r['per_expert_actor_bytes'][n] / gib:.1f} GiB" for n in ACTOR_COUNTS)
        lines.append(f"| {name} | {r['total_published_bytes'] / gib:.1f} GiB | {r['routed_expert_bytes'] / gib:.1f} GiB"
                     f" | {r['gating_actor_bf16_bytes'] / gib:.1f} GiB | {per} | {r['spec_bytes_per_token']:,.0f} | "
                     f"{r[f'bytes_per_token_at_{CONTEXT}']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.hub_sizes", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/hub_sizes.json"))
    args = p.parse_args(argv)
    rows = table()
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
