"""Failover and rebalancing benchmark: the stall an expert-actor kill and a node loss cause, and throughput on a
skewed load before and after EPLB, all in one run.

    python -m moeray.bench.failover [--repeats 3] [--out bench/results/failover.json]
    python -m moeray.bench.failover --chaos [--rounds 5 --faults-per-round 4 --requests 12 --seed 0]

Stall = time from the kill to the next token of the affected requests (max over the requests streaming at
that moment), reported next to the median inter-token time of the same run. Model: tiny random checkpoints
built by transformers (seeded): the stall is dominated by detection and re-dispatch, not model size.
Chaos (`--chaos`): rounds of ragged greedy batches streamed while expert, gating, KV-shard and controller actors
are killed at random points (one pair of kills less than 1 s apart per round); every request must end with
exactly max_tokens tokens that pass the teacher-forcing check against transformers (fp32); the worst stall
(kill -> next token of the slowest stream that was streaming) per kind is reported.
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

from moeray.bench.common import finish


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


# ---- chaos: random kills of every kind while ragged greedy batches run ---------------------------------------
KINDS = ("expert", "gating", "kv_shard", "controller")


def chaos_config(path: str):
    """4 expert groups x 2 replicas, 2 gating actors, a 2-shard KV store (r=2), the controller; CPU shares small
    enough for a 2-core machine; actors restarted without limit (a run kills some of them several times)."""
    from moeray.common.config import KVStoreConfig, ServeConfig

    return ServeConfig(model=path, dtype="float32", num_expert_groups=4, expert_replicas=2, num_gating_actors=2,
                       kv_cache_blocks=256, expert_num_cpus=0.1, gating_num_cpus=0.2, max_restarts=-1,
                       health_period_s=0.5, kv_store=KVStoreConfig(enabled=True, num_shards=2, replication=2,
                                                                    shard_num_cpus=0.05))


def _kill(dep, kind: str, rng) -> str:
    if kind == "expert":
        actors = dep.expert_actors
        a = rng.choice(sorted(actors))
        ray.kill(actors[a], no_restart=False)
        return f"expert {a}"
    if kind == "gating":
        i = rng.randrange(len(dep.gating))
        ray.kill(dep.gating[i], no_restart=False)
        return f"gating {i}"
    if kind == "kv_shard":
        k = rng.choice(sorted(dep.kv_shards))
        ray.kill(dep.kv_shards[k], no_restart=False)
        return f"kv shard {k}"
    ray.kill(dep.controller, no_restart=False)
    return "controller"


def _plan_faults(rng, faults_per_round: int) -> list[tuple[float, str, float]]:
    """(fraction of the round's tokens at which to fire, kind, delay after that point): one pair of kills within
    one second per round; every kind once per round (when faults_per_round >= 4), in random order."""
    fracs = sorted(rng.uniform(0.1, 0.75) for _ in range(faults_per_round - 1))
    kinds = rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS) for _ in range(faults_per_round - len(KINDS))]
    kinds = kinds[:faults_per_round]
    plan = [(f, k, 0.0) for f, k in zip(fracs, kinds, strict=False)]
    twin = rng.randrange(len(plan))
    plan.append((plan[twin][0], kinds[-1], rng.uniform(0.2, 0.9)))  # a second kill < 1 s after that one
    return sorted(plan, key=lambda p: (p[0], p[2]))


async def _chaos_round(dep, prompts, params, plan, rng) -> tuple[list[list[int]], list[dict[str, Any]]]:
    times: list[list[float]] = [[] for _ in prompts]
    toks: list[list[int]] = [[] for _ in prompts]
    total = sum(p.max_tokens for p in params)
    faults: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        async for d in dep.stream(dep.new_request_id(), prompts[i], params[i]):
            toks[i] += d.token_ids
            times[i] += [time.perf_counter()] * len(d.token_ids)

    async def chaos() -> None:
        for frac, kind, delay in plan:
            while sum(len(t) for t in toks) < frac * total:
                await asyncio.sleep(0.01)
            if delay:
                await asyncio.sleep(delay)
            active = [i for i in range(len(prompts)) if len(toks[i]) < params[i].max_tokens]
            faults.append({"kind": kind, "t": time.perf_counter(), "victim": _kill(dep, kind, rng),
                           "active": active})

    await asyncio.gather(chaos(), *[one(i) for i in range(len(prompts))])
    for f in faults:  # stall: kill -> the next token of the slowest stream that was streaming then
        nxt = [min(t for t in times[i] if t > f["t"]) - f["t"] for i in f["active"]
               if any(t > f["t"] for t in times[i])]
        f["stall_s"] = max(nxt) if nxt else None
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False)]
    for f in faults:
        f["itl_s_median"] = statistics.median(gaps) if gaps else None
    return toks, faults


def chaos_run(dep, path: str, rounds: int, faults_per_round: int, requests: int, seed: int = 0,
              check=None) -> dict[str, Any]:
    """`rounds` batches of `requests` ragged greedy requests (EOS ignored), `faults_per_round` random kills each;
    `check(prompt, tokens, max_tokens)` -> list of teacher-forcing failures (default: transformers in fp32)."""
    import random

    from moeray.common import SamplingParams

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    check = check or _teacher_check(path)
    all_faults, lost, wrong, short = [], 0, 0, 0
    for r in range(rounds):
        prompts = [torch.randint(0, 512, (int(torch.randint(4, 80, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(requests)]
        params = [SamplingParams(max_tokens=int(torch.randint(16, 48, (1,), generator=g)), temperature=0.0,
                                 ignore_eos=True) for _ in range(requests)]
        try:
            toks, faults = asyncio.run(_chaos_round(dep, prompts, params, _plan_faults(rng, faults_per_round), rng))
        except Exception as e:  # noqa: BLE001 - a lost batch is the failure this run looks for: count it
            print(f"round {r}: batch lost: {type(e).__name__}: {e}", flush=True)
            lost += requests
            continue
        for p, sp, t in zip(prompts, params, toks, strict=True):
            short += len(t) != sp.max_tokens
            wrong += bool(check(p, t, sp.max_tokens))
        for f in faults:
            f["round"] = r
            f.pop("active")
        all_faults += faults
        print(f"round {r}: {len(faults)} faults ({', '.join(f['victim'] for f in faults)}), worst stall "
              f"{max((f['stall_s'] or 0) for f in faults) * 1e3:.0f} ms", flush=True)
        time.sleep(1.0)
    by_kind = {}
    for k in KINDS:
        st = [f["stall_s"] for f in all_faults if f["kind"] == k and f["stall_s"] is not None]
        by_kind[k] = {"faults": sum(f["kind"] == k for f in all_faults), "stall_s_max": max(st, default=None),
                      "stall_s_median": statistics.median(st) if st else None}
    twins = sum(1 for a, b in zip(all_faults, all_faults[1:], strict=False)
                if a["round"] == b["round"] and b["t"] - a["t"] < 1.0)
    return {"rounds": rounds, "requests": rounds * requests, "faults": len(all_faults), "kills_within_1s": twins,
            "lost_requests": lost, "wrong_length": short, "teacher_forcing_failures": wrong, "by_kind": by_kind,
            "fault_log": [{k: v for k, v in f.items() if k != "t"} for f in all_faults]}


def _teacher_check(path: str):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def check(prompt: list[int], tokens: list[int], max_tokens: int) -> list[int]:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + tokens])).logits[0]
        rows = ref[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
        gaps = rows.max(-1).values - rows.gather(1, torch.tensor(tokens).view(-1, 1)).squeeze(1)
        return [i for i, gap in enumerate(gaps.tolist()) if gap > 1e-3]

    return check


def bench_chaos(rounds: int, faults_per_round: int, requests: int, seed: int) -> dict[str, Any]:
    from moeray.actors.deploy import deploy

    path = _build("qwen3_moe")
    dep = deploy(chaos_config(path))
    try:
        return chaos_run(dep, path, rounds, faults_per_round, requests, seed)
    finally:
        dep.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.failover", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/failover.json"))
    p.add_argument("--skip-node-loss", action="store_true")
    p.add_argument("--skip-eplb", action="store_true")
    p.add_argument("--chaos", action="store_true", help="only the randomized fault run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--faults-per-round", type=int, default=4)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res: dict[str, Any] = {"bench": "failover"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    if args.chaos:
        res["chaos"] = c = bench_chaos(args.rounds, args.faults_per_round, args.requests, args.seed)
        print(f"chaos: {c['faults']} faults over {c['rounds']} rounds ({c['kills_within_1s']} within 1 s of the "
              f"previous), {c['requests']} requests: lost {c['lost_requests']}, wrong length {c['wrong_length']}, "
              f"teacher-forcing failures {c['teacher_forcing_failures']}")
        for k, v in c["by_kind"].items():
            worst = "-" if v["stall_s_max"] is None else f"{v['stall_s_max'] * 1e3:.0f} ms"
            print(f"  {k:10s} {v['faults']:2d} faults, worst stall {worst}")
        out = args.out.with_name("failover_chaos.json") if args.out.name == "failover.json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    print("[1/3] expert-actor kill ...", flush=True)
    res["expert_kill"] = bench_expert_kill(args.repeats)
    if not args.skip_eplb:
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
    e = res.get("eplb")
    if e:
        print(f"EPLB         imbalance {e['imbalance_before']:.2f} -> {e['imbalance_after']:.2f}, throughput "
              f"{e['speedup']:.2f}x after/before, outputs unchanged: {e['outputs_unchanged']}")
    return finish(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
