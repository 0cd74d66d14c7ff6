"""KV-cache benchmark: what each codec and attention family costs per token, against an MHA bf16 baseline.

    python -m moeray.bench.kv [--out bench/results/kv.json] [--block-size 64] [--sections bytes_per_token]

The baseline is multi-head attention of the same hidden size and head count, caching K and V in bf16:
2 * hidden_size * 2 bytes per token per layer (head_dim = hidden_size / num_heads). Bytes are measured, not
computed: a block of random rows is encoded with each codec, so int8/int4 scales and frame headers count.
  payload  the codec's parts (quantised data + scales) per token per layer
  stored   the whole framed block (header included) for a block of `--layers` layers, per token per layer

Sections (a (name, run, format) entry each in SECTIONS): bytes_per_token, v4_context (DeepSeek-V4 at 4k/64k/1M
context next to V3 MLA and MHA: a projection from the config), v4_measured (bytes per token held by a live
sequence in the running engine's cache pools at 4k and 32k tokens, tiny V4 with V4's proportions, next to the
projection for that model; the longest prompt a fixed budget holds, pools vs every row kept), ttft (time to first
token with a 1,024-token prefix shared with an earlier request: from the engine's own cache with the KV store
off, and from the KV store in a fresh engine, vs cold), routing (prefix hit rate of 2 gating engines routed by
router/affinity.py vs least-loaded vs 1 engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


# ---- DeepSeek-V4 at long context -------------------------------------------------------------------------
V4_CONTEXTS = (4096, 65536, 1 << 20)


def v4_default_spec():
    """V4's cache at transformers' default DeepseekV4Config sizes (the released model's shape)."""
    from transformers import DeepseekV4Config

    from moeray.models.config import ModelConfig
    from moeray.models.registry import build_dense_model

    hf = DeepseekV4Config().to_dict()
    hf["model_type"] = "deepseek_v4"
    cfg = ModelConfig.from_hf_dict(hf)
    with torch.device("meta"):
        dense = build_dense_model(cfg)
    return cfg, dense.cache_spec()


def run_v4_context(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per token held at 4k / 64k / 1M context: V4 (window + compressed rows + indexer keys, windowed
    tensors keeping only their window) next to DeepSeek-V3 MLA (kv_lora 512 + rope 64, 61 layers) and MHA of
    V4's width. Computed from the config (`held_bytes`); the 4k figure is also measured by encoding the
    blocks a 4k sequence fills (codec none, bf16), which keeps every block of the windowed tensors."""
    from moeray.models.v4.cache import held_bytes

    cfg, spec = v4_default_spec()
    bf16 = 2
    mla = 61 * (512 + 64) * bf16
    mha = cfg.num_hidden_layers * 2 * cfg.hidden_size * bf16
    rows = []
    for n in V4_CONTEXTS:
        v4 = held_bytes(spec, n, bf16) / n
        rows.append({"context": n, "v4_bytes_per_token": v4, "v3_mla_bytes_per_token": mla,
                     "mha_bytes_per_token": mha, "v4_over_mla": v4 / mla, "v4_over_mha": v4 / mha})
    # measured at 4k: encode one block per layer kind and scale by the blocks 4k tokens fill (no window drop)
    gen = torch.Generator().manual_seed(args.seed)
    block = 128 * spec.block_multiple() // spec.block_multiple()
    block = max(block, spec.block_multiple())
    payload = [random_layer(layer, block, torch.bfloat16, gen) for layer in spec.layers]
    measured = len(encode_block(payload, "none")) / block
    return {"model": "transformers DeepseekV4Config() defaults", "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "rows": rows,
            "measured_4k_no_window_drop_bytes_per_token": measured,
            "note": "the paged cache does not yet drop rows outside a window: today a V4 sequence holds the "
                    "measured figure; held_bytes is what it holds once windowed tensors give rows back"}


def format_v4_context(result: dict[str, Any]) -> str:
    lines = [f"DeepSeek-V4 cache bytes per token (bf16; {result['model']}, {result['layers']} layers)",
             f"{'context':>9}{'V4':>11}{'V3 MLA':>10}{'MHA':>11}{'V4/MLA':>9}{'V4/MHA':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['context']:>9}{r['v4_bytes_per_token']:>11.0f}{r['v3_mla_bytes_per_token']:>10.0f}"
                     f"{r['mha_bytes_per_token']:>11.0f}{r['v4_over_mla']:>9.3f}{r['v4_over_mha']:>9.4f}")
    lines.append(f"measured (4k, every block kept): {result['measured_4k_no_window_drop_bytes_per_token']:.0f} B/token")
    return "\n".join(lines)


# ---- DeepSeek-V4 measured in the running engine ------------------------------------------------------------
V4_MEASURED_CONTEXTS = (4096, 32768)


def tiny_v4_hf_config(max_positions: int):
    """A tiny V4 with V4's proportions: window 128, CSA m=4 / HCA m'=128, index head dim = head dim / 4,
    rope on 1/8 of each head, HCA and CSA layers alternating (the released model: 23 HCA, 20 CSA)."""
    import transformers as tf

    return tf.DeepseekV4Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        partial_rotary_factor=0.125, q_lora_rank=32, o_groups=2, o_lora_rank=16, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, sliding_window=128,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"] * 2,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        index_n_heads=4, index_head_dim=16, index_topk=64, hc_mult=2, hc_sinkhorn_iters=5,
        max_position_embeddings=max_positions, eos_token_id=1, bos_token_id=0, tie_word_embeddings=False)


def longest_prompt(pools, block_size: int, itemsize: int, budget: int, max_num_seqs: int, chunk: int) -> int:
    """The longest sequence (tokens, block granularity) one gating actor's cache of `budget` bytes can hold."""
    from moeray.engine.block_manager import size_pools

    pages = size_pools(pools, block_size, itemsize, num_blocks=0, kv_cache_bytes=budget, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=chunk)
    return min(n * p.page_tokens for n, p in zip(pages, pools, strict=True) if not p.window)


def every_row_kept_pools(spec, block_size: int):
    """The cache as it was before pools: every tensor paged by blocks, nothing dropped (windows ignored)."""
    from moeray.engine.paged_cache import PoolSpec

    tensors = tuple((i, t) for i, layer in enumerate(spec.layers) for t in layer.tensors)
    return (PoolSpec(1, 0, block_size, tuple((i, t) for i, t in tensors if t.tokens_per_row == 1)),
            *(PoolSpec(m, 0, block_size, tuple((i, t) for i, t in tensors if t.tokens_per_row == m))
              for m in sorted({t.tokens_per_row for _, t in tensors} - {1})))


def run_v4_measured(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per token a live V4 sequence holds in the engine's pools (bf16 storage), between decode steps
    after a prefill of N tokens, against `held_bytes` (the projection) for the same model; and the longest
    prompt a fixed budget holds with pools vs with every row kept (the old cache), at the default V4 sizes."""
    import tempfile
    import time

    import transformers as tf

    from moeray.common import SamplingParams
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.paged_cache import plan_pools
    from moeray.engine.transport import LocalTransport
    from moeray.models.reference import ReferenceModel
    from moeray.models.v4.cache import held_bytes
    from moeray.router.table import RoutingTable

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    contexts = args.v4_contexts
    path = Path(tempfile.mkdtemp(prefix="moeray-v4kv-"))
    tf.DeepseekV4ForCausalLM(tiny_v4_hf_config(max(contexts) + 64)).save_pretrained(path)
    ref = ReferenceModel.from_pretrained(path, num_expert_groups=1)
    spec = ref.dense.cache_spec()
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 1)
    bf16, block = 2, 128
    rows = []
    for n in contexts:
        budget = 4 * held_bytes(spec, n + 8, bf16) + (1 << 20)
        eng = Engine(ref.dense, LocalTransport({0: ref.groups[0]}, table),
                     EngineConfig(block_size=block, kv_cache_bytes=budget, kv_cache_dtype=torch.bfloat16,
                                  max_num_batched_tokens=1024, max_num_seqs=4))
        g = torch.Generator().manual_seed(args.seed)
        eng.add_request("m", torch.randint(2, 256, (n,), generator=g).tolist(), SamplingParams(
            max_tokens=3, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        held = None
        while eng.has_unfinished():
            eng.step()
            seq = eng.seqs.get("m")
            if seq is not None and seq.num_computed >= n and held is None:
                held = (eng.blocks.held_bytes(seq), seq.num_computed)  # between steps, after the prefill
        measured, tokens = held
        projected = held_bytes(spec, tokens, bf16)
        rows.append({"context": tokens, "measured_bytes_per_token": measured / tokens,
                     "projected_bytes_per_token": projected / tokens, "measured_over_projected": measured / projected,
                     "every_row_kept_bytes_per_token": spec.bytes_per_token(bf16),
                     "prefill_s": time.perf_counter() - t0})
    # the longest prompt in a fixed budget at transformers' default V4 sizes (sizing only; nothing allocated)
    _, big = v4_default_spec()
    budget = args.v4_budget_gib << 30
    pools = plan_pools(big, block)
    longest = {"budget_bytes": budget, "block_size": block, "max_num_seqs": 64, "chunk_tokens": 512,
               "pools_bf16": longest_prompt(pools, block, 2, budget, 64, 512),
               "pools_fp32": longest_prompt(pools, block, 4, budget, 64, 512),
               "every_row_kept_fp32": longest_prompt(every_row_kept_pools(big, block), block, 4, budget, 64, 512)}
    longest["ratio_fp32"] = longest["pools_fp32"] / longest["every_row_kept_fp32"]
    longest["ratio_bf16_vs_old_fp32"] = longest["pools_bf16"] / longest["every_row_kept_fp32"]
    worst = max(abs(r["measured_over_projected"] - 1) for r in rows)
    return {"model": "tiny V4 with V4's proportions (bench.kv.tiny_v4_hf_config), bf16 cache storage, block 128",
            "rows": rows, "worst_deviation": worst, "goal_deviation": 0.04, "longest_prompt": longest,
            "measured": "pool pages held by the live sequence (BlockManager.held_bytes) between decode steps",
            "projected": "models.v4.cache.held_bytes: windowed tensors hold their window, others 1/m rows"}


def format_v4_measured(r: dict[str, Any]) -> str:
    lines = [f"DeepSeek-V4 bytes per token held by a live sequence, measured in the engine ({r['model']})",
             f"{'context':>9}{'measured':>10}{'projected':>11}{'ratio':>8}{'every row kept':>16}"]
    for x in r["rows"]:
        lines.append(f"{x['context']:>9}{x['measured_bytes_per_token']:>10.1f}{x['projected_bytes_per_token']:>11.1f}"
                     f"{x['measured_over_projected']:>8.3f}{x['every_row_kept_bytes_per_token']:>16.1f}")
    verdict = "met" if r["worst_deviation"] <= r["goal_deviation"] else "NOT met"
    lines.append(f"worst |measured/projected - 1| = {r['worst_deviation']:.3%} (goal <= 4%: {verdict})")
    lo = r["longest_prompt"]
    lines.append(f"longest prompt in {lo['budget_bytes'] / (1 << 30):.0f} GiB at default V4 sizes: pools fp32 "
                 f"{lo['pools_fp32']} / bf16 {lo['pools_bf16']} tokens vs every row kept fp32 "
                 f"{lo['every_row_kept_fp32']} -> {lo['ratio_fp32']:.1f}x (fp32), {lo['ratio_bf16_vs_old_fp32']:.1f}x "
                 "(bf16 vs the old fp32) (goal >= 20x)")
    return "\n".join(lines)


# ---- time to first token with a cached prefix ----------------------------------------------------------------
def run_ttft(args: argparse.Namespace) -> dict[str, Any]:
    """TTFT of a request sharing its first 1,024 tokens with an earlier request, vs the same request cold (same
    run): from the gating engine's own cache with the KV store off (the earlier request ran on the same engine),
    and from the KV store in a fresh engine.

    Model: qwen3_moe built by transformers (seed 0; the engine benchmark's shape: hidden 512, 8 layers, 16 experts
    top-2), engine in process with the local transport and an in-process shard store (`none` codec)."""
    import tempfile
    import time

    import transformers as tf

    from moeray.common import SamplingParams
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.prefix import LocalKVClient, PrefixCache
    from moeray.engine.transport import LocalTransport
    from moeray.kvstore.store import ShardStore
    from moeray.models.reference import ReferenceModel
    from moeray.router.table import RoutingTable

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf_cfg = tf.Qwen3MoeConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16,
                               num_experts_per_tok=2, moe_intermediate_size=512, max_position_embeddings=4096)
    path = Path(tempfile.mkdtemp(prefix="moeray-ttft-"))
    tf.Qwen3MoeForCausalLM(hf_cfg).save_pretrained(path)
    ref = ReferenceModel.from_pretrained(path, num_expert_groups=4)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 4)
    store = ShardStore(1 << 30)
    prefix_len, new_len = args.prefix_tokens, 16

    def engine(with_store: bool, caching: bool = True):
        return Engine(ref.dense, LocalTransport(dict(enumerate(ref.groups)), table),
                      EngineConfig(block_size=16, num_blocks=512, max_num_batched_tokens=2048, prefix_caching=caching),
                      prefix=PrefixCache(LocalKVClient(store), 16, "ttft-bench", "none") if with_store else None)

    def ttft(eng, prompt):  # engines are built outside the timer: TTFT is admission -> first token
        t0 = time.perf_counter()
        out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
        return time.perf_counter() - t0, out.num_cached_tokens

    g = torch.Generator().manual_seed(args.seed)
    times: dict[str, list[float]] = {"cold": [], "local": [], "store": []}
    for _ in range(args.repeats):
        shared = torch.randint(0, 4096, (prefix_len,), generator=g).tolist()
        a = shared + torch.randint(0, 4096, (new_len,), generator=g).tolist()
        b = shared + torch.randint(0, 4096, (new_len,), generator=g).tolist()
        local = engine(with_store=False)
        t_cold, c0 = ttft(local, a)  # KV store off: the earlier request leaves its blocks in the engine's cache
        t_local, c1 = ttft(local, b)
        ttft(engine(with_store=True, caching=False), a)  # writes the prefix through to the store
        t_store, c2 = ttft(engine(with_store=True), b)  # a fresh engine: the prefix comes from the store
        assert c0 == 0 and c1 == prefix_len and c2 == prefix_len, (c0, c1, c2)
        for k, t in (("cold", t_cold), ("local", t_local), ("store", t_store)):
            times[k].append(t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"prefix_tokens": prefix_len, "new_tokens": new_len, "repeats": args.repeats,
            "cold_ttft_s_median": med["cold"], "local_cache_ttft_s_median": med["local"],
            "store_ttft_s_median": med["store"], "local_ratio": med["local"] / med["cold"],
            "store_ratio": med["store"] / med["cold"], "ratio": med["store"] / med["cold"], "goal_ratio": 0.2}


def format_ttft(r: dict[str, Any]) -> str:
    def verdict(x: float) -> str:
        return "met" if x <= r["goal_ratio"] else "NOT met"

    return (f"TTFT with a {r['prefix_tokens']}-token prefix shared with an earlier request (+{r['new_tokens']} new) "
            f"vs cold, median of {r['repeats']}: engine's own cache, KV store off = {r['local_ratio']:.3f}x cold "
            f"({verdict(r['local_ratio'])}); from the KV store in a fresh engine = {r['store_ratio']:.3f}x cold "
            f"({verdict(r['store_ratio'])}; goal <= {r['goal_ratio']})")


# ---- cache-aware routing across gating actors ----------------------------------------------------------------
def run_routing(args: argparse.Namespace) -> dict[str, Any]:
    """Prefix hit rate with 2 gating engines routed by router/affinity.py vs by least load, against 1 engine:
    32 requests sharing 4 long prefixes, KV store off. Engines run in process (qwen3_moe built by transformers,
    local transport), stepped in turn; the router sees each engine's in-flight count, as the front end does. A
    request arrives every `--arrival-steps` engine steps."""
    import tempfile

    import transformers as tf

    from moeray.common import SamplingParams
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.transport import LocalTransport
    from moeray.models.reference import ReferenceModel
    from moeray.router.affinity import affinity_order, prefix_key
    from moeray.router.table import RoutingTable

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf_cfg = tf.Qwen3MoeConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=128, max_position_embeddings=2048)
    path = Path(tempfile.mkdtemp(prefix="moeray-routing-"))
    tf.Qwen3MoeForCausalLM(hf_cfg).save_pretrained(path)
    ref = ReferenceModel.from_pretrained(path, num_expert_groups=1)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 1)
    g = torch.Generator().manual_seed(args.seed)
    prefixes = [torch.randint(0, 1024, (args.routing_prefix_tokens,), generator=g).tolist() for _ in range(4)]
    order = torch.randperm(32, generator=g).tolist()
    prompts = [prefixes[i % 4] + torch.randint(0, 1024, (16,), generator=g).tolist() for i in order]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def run(num_engines: int, policy: str) -> dict[str, Any]:
        engines = [Engine(ref.dense, LocalTransport({0: ref.groups[0]}, table),
                          EngineConfig(block_size=16, num_blocks=1024, max_num_batched_tokens=512, max_num_seqs=8))
                   for _ in range(num_engines)]
        inflight = [0] * num_engines
        owner: dict[str, int] = {}
        cached = 0
        pending, tick, rr = list(enumerate(prompts)), 0, 0
        while pending or any(e.has_unfinished() for e in engines):
            if pending and tick % args.arrival_steps == 0:
                i, p = pending.pop(0)
                if policy == "affinity":
                    e = affinity_order(prefix_key(p), inflight)[0]
                else:  # least loaded, ties rotating (order_by_load)
                    e = min(range(num_engines), key=lambda k: (inflight[k], (k - rr) % num_engines))
                    rr += 1
                engines[e].add_request(f"r{i}", p, params)
                owner[f"r{i}"], inflight[e] = e, inflight[e] + 1
            tick += 1
            for e in engines:
                for d in e.step():
                    if d.finish_reason is not None:
                        inflight[owner[d.request_id]] -= 1
                        cached += d.num_cached_tokens
        total = sum(len(p) for p in prompts)
        return {"engines": num_engines, "policy": policy, "hit_rate": cached / total,
                "per_engine_requests": [sum(1 for o in owner.values() if o == k) for k in range(num_engines)]}

    one = run(1, "single")
    aff = run(2, "affinity")
    least = run(2, "least_loaded")
    return {"requests": 32, "prefixes": 4, "prefix_tokens": args.routing_prefix_tokens, "new_tokens": 16,
            "arrival_steps": args.arrival_steps, "single": one, "affinity": aff, "least_loaded": least,
            "affinity_over_single": aff["hit_rate"] / one["hit_rate"],
            "least_loaded_over_single": least["hit_rate"] / one["hit_rate"], "goal": 0.9,
            "hit_rate": "prompt tokens whose KV came from the engine's own cache / all prompt tokens"}


def format_routing(r: dict[str, Any]) -> str:
    verdict = "met" if r["affinity_over_single"] >= r["goal"] else "NOT met"
    return (f"Prefix hit rate, {r['requests']} requests sharing {r['prefixes']} prefixes of {r['prefix_tokens']} "
            f"tokens, KV store off: 1 engine {r['single']['hit_rate']:.3f}; 2 engines cache-aware "
            f"{r['affinity']['hit_rate']:.3f} ({r['affinity_over_single']:.1%} of single, goal >= 90%: {verdict}; "
            f"requests per engine {r['affinity']['per_engine_requests']}); 2 engines least-loaded "
            f"{r['least_loaded']['hit_rate']:.3f} ({r['least_loaded_over_single']:.1%})")


Section = tuple[str, Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], str]]
SECTIONS: tuple[Section, ...] = (
    ("bytes_per_token", run_bytes_per_token, format_bytes_per_token),
    ("v4_context", run_v4_context, format_v4_context),
    ("v4_measured", run_v4_measured, format_v4_measured),
    ("ttft", run_ttft, format_ttft),
    ("routing", run_routing, format_routing),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [name for name, _, _ in SECTIONS]
    p = argparse.ArgumentParser(prog="python -m moeray.bench.kv", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/kv.json"), help="JSON results path")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block")
    p.add_argument("--layers", type=int, default=4, help="layers per encoded block (amortises the header)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-tokens", type=int, default=1024, help="cached prefix length for the TTFT section")
    p.add_argument("--repeats", type=int, default=3, help="TTFT repeats (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the TTFT and v4_measured sections")
    p.add_argument("--v4-contexts", type=int, nargs="+", default=list(V4_MEASURED_CONTEXTS),
                   help="prompt lengths for v4_measured")
    p.add_argument("--routing-prefix-tokens", type=int, default=512, help="shared prefix length (routing)")
    p.add_argument("--arrival-steps", type=int, default=2, help="engine steps between arrivals (routing)")
    p.add_argument("--v4-budget-gib", type=int, default=64, help="fixed budget for the longest-prompt figure")
    p.add_argument("--sections", nargs="+", choices=names, default=names)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"bench": "kv", "torch": torch.__version__, "sections": {}}
    for name, run, fmt in SECTIONS:
        if name in args.sections:
            results["sections"][name] = section = run(args)
            print(fmt(section), end="\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
