"""KV benchmark section bytes_per_token: what each codec costs per token per layer for each attention family,
against an MHA bf16 baseline (the CLI is moeray.bench.kv)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from moeray.kvstore.codec import encode_block
from moeray.kvstore.frame import unpack_frame
from moeray.kvstore.spec import LayerCacheSpec, gqa_spec, mla_spec

MLA_INT8_GOAL = 0.10  # issue 4: <= 10% of the MHA baseline with int8


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    hidden_size: int
    num_heads: int
    layer: LayerCacheSpec  # what one attention layer caches

    def mha_bf16_bytes_per_token(self) -> int:
        return 2 * self.hidden_size * 2  # K and V: num_heads x (hidden_size / num_heads) each, 2 bytes


FAMILIES = (
    Family("deepseek-v3", 7168, 128, mla_spec(kv_lora_rank=512, rope_dim=64)),
    Family("qwen3-235b-a22b", 4096, 64, gqa_spec(num_kv_heads=4, head_dim=128)),
    Family("mixtral-8x7b", 4096, 32, gqa_spec(num_kv_heads=8, head_dim=128)),
)
# (label, codec, dtype of the rows handed to the codec)
CODEC_VARIANTS = (
    ("none/fp32", "none", torch.float32),
    ("none/bf16", "none", torch.bfloat16),
    ("fp16", "fp16", torch.bfloat16),
    ("int8", "int8", torch.bfloat16),
    ("int4", "int4", torch.bfloat16),
)


def random_layer(layer: LayerCacheSpec, block_size: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """One layer's rows for a block: name -> [R, *row_shape]."""
    return {
        t.name: torch.randn((t.rows_per_block(block_size), *t.row_shape), generator=gen).to(dtype)
        for t in layer.tensors
    }


def measure(family: Family, codec: str, dtype: torch.dtype, block_size: int, num_layers: int, seed: int) -> dict:
    """Encode a block of `num_layers` layers of `family` and return payload/stored bytes per token per layer."""
    gen = torch.Generator().manual_seed(seed)
    block = [random_layer(family.layer, block_size, dtype, gen) for _ in range(num_layers)]
    frame = encode_block(block, codec)
    header, _ = unpack_frame(frame)
    payload = sum(n for entries in header["layers"] for e in entries for _, n in e["parts"].values())
    per = block_size * num_layers
    baseline = family.mha_bf16_bytes_per_token()
    return {
        "payload_bytes_per_token": payload / per,
        "stored_bytes_per_token": len(frame) / per,
        "payload_ratio": payload / per / baseline,
        "stored_ratio": len(frame) / per / baseline,
    }


def run_bytes_per_token(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for family in FAMILIES:
        for label, codec, dtype in CODEC_VARIANTS:
            m = measure(family, codec, dtype, args.block_size, args.layers, args.seed)
            rows.append({"family": family.name, "kind": family.layer.kind, "codec": label, **m})
    mla_int8 = next(r for r in rows if r["kind"] == "mla" and r["codec"] == "int8")
    return {
        "baseline": "MHA bf16, same hidden size and head count: 2 * hidden_size * 2 bytes per token per layer",
        "block_size": args.block_size,
        "layers_per_block": args.layers,
        "baselines": {f.name: f.mha_bf16_bytes_per_token() for f in FAMILIES},
        "rows": rows,
        "goal_mla_int8_ratio": MLA_INT8_GOAL,
        "goal_met": mla_int8["stored_ratio"] <= MLA_INT8_GOAL,
    }


def format_bytes_per_token(result: dict[str, Any]) -> str:
    lines = [
        f"KV bytes per token per layer (block {result['block_size']} tokens, {result['layers_per_block']} layers"
        " per frame); ratio vs MHA bf16 of the same hidden size and head count",
        f"{'family':<17}{'kind':<5}{'codec':<11}{'payload B':>10}{'stored B':>10}{'ratio':>9}{'stored ratio':>14}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['family']:<17}{r['kind']:<5}{r['codec']:<11}{r['payload_bytes_per_token']:>10.1f}"
            f"{r['stored_bytes_per_token']:>10.1f}{r['payload_ratio']:>9.2%}{r['stored_ratio']:>14.2%}"
        )
    base = ", ".join(f"{k} {v} B" for k, v in result["baselines"].items())
    lines.append(f"MHA bf16 baselines: {base}")
    verdict = "met" if result["goal_met"] else "NOT met"
    lines.append(f"goal: MLA int8 stored <= {result['goal_mla_int8_ratio']:.0%} of MHA bf16 -> {verdict}")
    return "\n".join(lines)
