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
from pathlib import Path
from typing import Any

import torch

from moeray.bench.kv_codecs import (  # noqa: F401 (re-exported)
    CODEC_VARIANTS,
    FAMILIES,
    MLA_INT8_GOAL,
    Family,
    format_bytes_per_token,
    measure,
    random_layer,
    run_bytes_per_token,
)
from moeray.bench.kv_v4 import (  # noqa: F401 (re-exported)
    V4_CONTEXTS,
    V4_MEASURED_CONTEXTS,
    every_row_kept_pools,
    format_v4_context,
    format_v4_measured,
    longest_prompt,
    run_v4_context,
    run_v4_measured,
    tiny_v4_hf_config,
    v4_default_spec,
)


# ---- time to first token with a cached prefix ----------------------------------------------------------------
def tiny_qwen3(prefix: str, num_groups: int, **sizes: int) -> tuple[Any, Any]:
    """A qwen3_moe checkpoint built by transformers (under the caller's torch seed) in a temporary folder, loaded as
    a ReferenceModel split into `num_groups` expert groups; returns (model, its round-robin routing table)."""
    import tempfile

    import transformers as tf

    from moeray.models.reference import ReferenceModel
    from moeray.router.table import RoutingTable

    path = Path(tempfile.mkdtemp(prefix=prefix))
    tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**sizes)).save_pretrained(path)
    ref = ReferenceModel.from_pretrained(path, num_expert_groups=num_groups)
    return ref, RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, num_groups)


def run_ttft(args: argparse.Namespace) -> dict[str, Any]:
    """TTFT of a request sharing its first 1,024 tokens with an earlier request, vs the same request cold (same
    run): from the gating engine's own cache with the KV store off (the earlier request ran on the same engine),
    and from the KV store in a fresh engine.

    Model: qwen3_moe built by transformers (seed 0; the engine benchmark's shape: hidden 512, 8 layers, 16 experts
    top-2), engine in process with the local transport and an in-process shard store (`none` codec)."""
    import time

    from moeray.common import SamplingParams
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.prefix import LocalKVClient, PrefixCache
    from moeray.engine.transport import LocalTransport
    from moeray.kvstore.store import ShardStore

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ref, table = tiny_qwen3("moeray-ttft-", 4, vocab_size=4096, hidden_size=512, intermediate_size=1024,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                            num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
                            max_position_embeddings=4096)
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


    from moeray.common import SamplingParams
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.transport import LocalTransport
    from moeray.router.affinity import affinity_order, prefix_key

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ref, table = tiny_qwen3("moeray-routing-", 1, vocab_size=1024, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                            max_position_embeddings=2048)
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
