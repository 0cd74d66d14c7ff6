"""Failover and rebalancing benchmark: the stall an expert-actor kill and a node loss cause, and throughput on a
skewed load before and after EPLB, all in one run.

    python -m moeray.bench.failover [--repeats 3] [--out bench/results/failover.json]

Stall = time from the kill to the next token of the affected requests (max over the requests streaming at
that moment), reported next to the median inter-token time of the same run. Model: tiny random checkpoints
built by transformers (seeded): the stall is dominated by detection and re-dispatch, not model size.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch


def _build(family: str, skew: bool = False) -> str:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=2048)
    if family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**common, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=128, n_group=1, topk_group=1, first_k_dense_replace=1,
                                  kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                  v_head_dim=16)
        model = tf.DeepseekV3ForCausalLM(cfg)
        if skew:  # every token to experts 0 and 1: one hot expert group
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name.endswith("e_score_correction_bias"):
                        buf.zero_()
                        buf[:2] = 5.0
    else:
        cfg = tf.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=128)
        model = tf.Qwen3MoeForCausalLM(cfg)
    out = Path(tempfile.mkdtemp(prefix=f"moeray-failover-{family}-"))
    model.save_pretrained(out)
    return str(out)


async def _stream_with_kill(dep, kill, n_req: int, max_tokens: int) -> tuple[float, list[float]]:
    """Stream n_req requests; after the 8th token of request 0, call kill(). Returns (stall_s, inter-token gaps)."""
    from moeray.common import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(n_req)]
    killed: list[float] = []

    async def one(i: int) -> None:
        async for d in dep.stream(dep.new_request_id(), list(range(1 + i, 40 + i)), sp):
            times[i].extend([time.perf_counter()] * len(d.token_ids))
            if i == 0 and len(times[0]) >= 8 and not killed:
                killed.append(time.perf_counter())
                kill()

    await asyncio.gather(*[one(i) for i in range(n_req)])
    t_kill = killed[0]
    stall = max(min(t for t in ts if t > t_kill) - t_kill for ts in times if any(t > t_kill for t in ts))
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False) if a < t_kill or a > t_kill + stall]
    return stall, gaps


def bench_expert_kill(repeats: int) -> dict[str, Any]:
    from moeray.actors.deploy import deploy
    from moeray.common.config import ServeConfig

    dep = deploy(ServeConfig(model=_build("qwen3_moe"), num_expert_groups=2, expert_replicas=2, kv_cache_blocks=256,
                             health_period_s=0.5))
    try:
        stalls, gaps = [], []
        for r in range(repeats):
            victim = dep.expert_actors[r % 2]
            s, g = asyncio.run(_stream_with_kill(dep, lambda v=victim: ray.kill(v, no_restart=False), 4, 48))
            stalls.append(s)
            gaps += g
            time.sleep(3)  # let Ray restart it and the controller re-admit it
        return {"stall_s": stalls, "stall_s_median": statistics.median(stalls),
                "inter_token_s_median": statistics.median(gaps),
                "stall_over_itl": statistics.median(stalls) / statistics.median(gaps)}
    finally:
        dep.shutdown()


def bench_node_loss(repeats: int) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    from moeray.actors.deploy import deploy
    from moeray.common.config import ServeConfig

    if ray.is_initialized():
        ray.shutdown()
    fast = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}
    stalls, gaps = [], []
    path = _build("qwen3_moe")
    for _ in range(repeats):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                                "_system_config": fast})
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [cluster.add_node(num_cpus=0, resources={"NPU": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        dep = deploy(ServeConfig(model=path, num_expert_groups=2, expert_replicas=2, device="npu",
                                 allow_cpu_fallback=True, expert_num_cpus=0, kv_cache_blocks=256,
                                 health_period_s=0.5))
        try:
            s, g = asyncio.run(_stream_with_kill(dep, functools.partial(cluster.remove_node, nodes[1]), 4, 48))
            stalls.append(s)
            gaps += g
        finally:
            dep.shutdown()
            ray.shutdown()
            cluster.shutdown()
    return {"stall_s": stalls, "stall_s_median": statistics.median(stalls),
            "inter_token_s_median": statistics.median(gaps),
            "stall_over_itl": statistics.median(stalls) / statistics.median(gaps)}


def bench_eplb(repeats: int) -> dict[str, Any]:
    from moeray.actors.deploy import deploy
    from moeray.common import SamplingParams
    from moeray.common.config import ServeConfig

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    dep = deploy(ServeConfig(model=_build("deepseek_v3", skew=True), num_expert_groups=4, placement="blocks",
                             kv_cache_blocks=512, max_num_batched_tokens=1024))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (64,), generator=g).tolist() for _ in range(32)]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

    def throughput() -> float:
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = dep.generate(prompts, sp)
            rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
        return statistics.median(rates)

    try:
        before_out = [o.token_ids for o in dep.generate(prompts, sp)]
        before = throughput()
        imb_before = ray.get(dep.controller.imbalance.remote())
        r = dep.rebalance(num_redundant=8)
        after_out = [o.token_ids for o in dep.generate(prompts, sp)]
        after = throughput()
        return {"tok_s_before": before, "tok_s_after": after, "speedup": after / before,
                "imbalance_before": imb_before, "imbalance_after": r.get("imbalance_after"),
                "outputs_unchanged": before_out == after_out}
    finally:
        dep.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.failover", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/failover.json"))
    p.add_argument("--skip-node-loss", action="store_true")
    args = p.parse_args(argv)
    res: dict[str, Any] = {"bench": "failover"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    print("[1/3] expert-actor kill ...", flush=True)
    res["expert_kill"] = bench_expert_kill(args.repeats)
    print("[2/3] EPLB on a skewed load ...", flush=True)
    res["eplb"] = bench_eplb(args.repeats)
    if not args.skip_node_loss:
        print("[3/3] node loss ...", flush=True)
        res["node_loss"] = bench_node_loss(args.repeats)
    for k in ("expert_kill", "node_loss"):
        if k in res:
            r = res[k]
            print(f"{k:12s} stall median {r['stall_s_median'] * 1e3:8.1f} ms  (median inter-token "
                  f"{r['inter_token_s_median'] * 1e3:.1f} ms, ratio {r['stall_over_itl']:.1f}x)")
    e = res["eplb"]
    print(f"EPLB         imbalance {e['imbalance_before']:.2f} -> {e['imbalance_after']:.2f}, throughput "
          f"{e['speedup']:.2f}x after/before, outputs unchanged: {e['outputs_unchanged']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
