"""Data-plane benchmark (issue 13): one MoE layer's expert call on Ray, piece by piece, next to an empty fan-out
to the same actors, and end-to-end Ray / in-process throughput, all in one run.

    python -m moeray.bench.dispatch [--quick] [--dtype auto] [--compare-object-store] [--out ...dispatch.json]

Checkpoint: bench/engine.py's (qwen3_moe, hidden 512, 8 MoE layers, 16 experts top-2, fp32 safetensors).
Systems: `ray` = deploy() on a private local Ray (num_cpus=2): 4 expert-group actors (--expert-groups), 1 gating
actor, no controller, 1 torch thread per actor, `--tensor-transport` (auto: socket on CPUs); `local` = the same
Engine with LocalTransport in this process (the layer probe at 1 thread; end to end at 1 and --local-threads).
Layer probe (from this process, interleaved rounds, medians): for T tokens routed by a random top-2 gate,
  socket        ChannelTransport submit + wait against the deployment's 4 expert actors (their own sockets)
  object_store  RayTransport submit + wait against the same actors (one Ray task per call)
  local         LocalTransport on the same slots in this process (the in-process step)
  fanout        an empty Ray call (`ping`) to exactly the actors the plan targets, all at once, waited for together
  socket_fanout an empty call (0 rows) on each target's channel, all at once
  nixl          (--tensor-transport nixl) RdtTransport on the same actors: rows and answers over Ray Direct Transport
  pieces        plan (plan_dispatch), pack (one gather into the wire dtype), encode (routing + rows' bytes),
                combine (one scatter of the answers); actor: the expert actors' time inside `forward` per call
                (wall, and CPU of its thread)
Goal: (the deployment's transport - local) / fanout <= 1.3 at T = 1, 16, 64.
End to end: B requests (64-token prompts, `--output-len` greedy tokens, EOS ignored), tok/s of ray / the faster
local setting, and the fraction of expert-call time hidden behind compute (1 - blocked wait / call time, gating
actor's transport counters; micro_batches as configured, default auto). Goal: >= 0.7 at B = 16, 64; >= 0.25 at
B = 1. --compare-object-store / --compare-mb1 time a second deployment (object store / micro_batches=1) in the
same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import host_info, interleaved_times, load_dense_checkpoint, write_json

BATCHES = (1, 16, 64)


def _cpu_flags() -> list[str]:
    from moeray.models.dtypes import cpu_flags

    flags = cpu_flags() or frozenset()
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))


def build_systems(path: Path, dtype: str, micro_batches: int,
                  tensor_transport: str = "object_store", expert_groups: int = 4) -> tuple[Any, Any]:
    from moeray.actors.deploy import build_table, deploy
    from moeray.actors.gating import engine_config
    from moeray.common.config import ServeConfig
    from moeray.engine.engine import Engine
    from moeray.engine.transport import LocalTransport
    from moeray.models.checkpoint import load_experts_into, new_expert_group
    from moeray.models.dtypes import resolve_dtype

    cfg = ServeConfig(model=str(path), num_expert_groups=expert_groups, controller=False, torch_threads=1,
                      dtype=dtype, micro_batches=micro_batches, namespace="moeray-bench-dispatch", kv_cache_blocks=1024,
                      tensor_transport=tensor_transport)
    dep = deploy(cfg)
    model_cfg, ckpt, dense = load_dense_checkpoint(path)
    dt = resolve_dtype(dtype, "cpu", reduced_ok=getattr(dense, "reduced_precision", False))
    if dt != torch.float32:
        dense.to(dt)
    table = build_table(cfg, model_cfg)
    groups = {}
    for a in table.actor_ids:
        g = new_expert_group(model_cfg, ckpt, dtype=dt)
        load_experts_into(g, model_cfg, ckpt, table.actor_slots(a))
        groups[a] = g
    local = Engine(dense, LocalTransport(groups, table), engine_config(cfg, dt))
    return dep, local


def layer_probe(dep, local, token_counts, repeats: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Both Ray transports on the deployment's actors, next to the in-process path (and NIXL where enabled)."""
    from moeray.actors.channel import ChannelTransport
    from moeray.actors.transport import RayTransport

    transports = {"socket": ChannelTransport(dict(dep.expert_actors), dep.table, wire_dtype=dtype),
                  "object_store": RayTransport(dict(dep.expert_actors), dep.table, wire_dtype=dtype)}
    if dep.config.tensor_transport == "nixl":  # the experts have RDT enabled: time the NIXL path next to them
        from moeray.actors.rdt import RdtTransport

        transports["nixl"] = RdtTransport(dict(dep.expert_actors), dep.table, wire_dtype=dtype)
    g = torch.Generator().manual_seed(0)
    used = dep.status()["gating"][0]["tensor_transport"]
    return [_probe_tokens(dep, transports, used, local.transport, t, repeats, dtype, g) for t in token_counts]


def _probe_tokens(dep, transports, used: str, local_tr, t: int, repeats: int, dtype: torch.dtype,
                  g) -> dict[str, Any]:
    """One row of the layer probe: T = t tokens through the first MoE layer. `used`: the deployment's tensor
    transport, whose overhead the goal is about."""
    import ray

    from moeray.engine.channel import wait_readable
    from moeray.engine.wire import call_buffers, encode_call, pack_rows, scatter_rows
    from moeray.router.dispatch import plan_dispatch

    cfg, table = dep.model_cfg, dep.table
    layer = list(cfg.moe_layers)[0]
    x = torch.randn(t, cfg.hidden_size, generator=g).to(dtype)
    ids = torch.rand(t, cfg.num_experts, generator=g).topk(cfg.num_experts_per_tok).indices
    w = torch.softmax(torch.rand(ids.shape, generator=g), dim=-1)
    slots = table.layer_slots(layer)
    batches = plan_dispatch(ids, w, slots, layer=layer)
    actors = dep.expert_actors  # one lookup
    targets = [actors[b.actor_id] for b in batches]
    packed = pack_rows(x, batches, dtype)
    outs = [torch.randn(b.num_rows, cfg.hidden_size).to(dtype) for b in batches]
    chan = transports["socket"].backend
    clients = [chan._client(b.actor_id) for b in batches]
    e = torch.zeros(0, dtype=torch.long)
    empty_rows, empty_meta = call_buffers(torch.zeros(0, cfg.hidden_size, dtype=dtype), e, e, e.float())

    def socket_fanout():  # an empty call (0 rows) on each target's channel, all at once
        futs = [c.call(layer, empty_meta, empty_rows) for c in clients]
        while not all(f.done() for f in futs):
            wait_readable(clients, 1.0)
        return [f.result() for f in futs]

    probes = {name: (lambda tr=tr: tr.wait(tr.submit(layer, x, ids, w))) for name, tr in transports.items()}
    probes.update({
        "local": lambda: local_tr.wait(local_tr.submit(layer, x, ids, w)),
        "fanout": lambda: ray.get([a.ping.remote() for a in targets]),
        "socket_fanout": socket_fanout,
        "plan": lambda: plan_dispatch(ids, w, slots, layer=layer),
        "pack": lambda: pack_rows(x, batches, dtype),
        "encode": lambda: [encode_call(p, b.pair_rows, b.slot_ids, b.weights)
                           for p, b in zip(packed, batches, strict=True)],
        "combine": lambda: scatter_rows(t, cfg.hidden_size, batches, outs, dtype),
    })
    busy0 = ray.get([a.stats.remote() for a in actors.values()])
    sub0 = {k: tr.stats["dispatch_s"] for k, tr in transports.items()}
    with torch.inference_mode():
        times = interleaved_times(probes, repeats, warmup=3)
    busy1 = ray.get([a.stats.remote() for a in actors.values()])
    calls = sum(b["calls"] - a["calls"] for a, b in zip(busy0, busy1, strict=True))
    busy = sum(b["busy_s"] - a["busy_s"] for a, b in zip(busy0, busy1, strict=True))
    cpu = sum(b.get("cpu_s", 0.0) - a.get("cpu_s", 0.0) for a, b in zip(busy0, busy1, strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    over = {k: med[k] - med["local"] for k in transports}
    return {"tokens": t, "target_actors": len(batches), "transport": used, **{f"{k}_s": v for k, v in med.items()},
            **{f"{k}_submit_s": (tr.stats["dispatch_s"] - sub0[k]) / (repeats + 3) for k, tr in transports.items()},
            "actor_compute_s_per_call": busy / max(calls, 1), "actor_cpu_s_per_call": cpu / max(calls, 1),
            **{f"{k}_overhead_over_fanout": o / med["fanout"] for k, o in over.items()},
            "overhead_s": over[used], "overhead_over_fanout": over[used] / med["fanout"],
            "ray_over_local": med[used] / med["local"]}


def end_to_end(dep, local, batches, output_len: int, rounds: int, vocab: int, others: dict[str, Any] | None = None,
               local_threads: tuple[int, ...] = (1,)) -> dict[int, dict[str, Any]]:
    """`others`: more deployments measured in the same rounds, by label (mb1: micro_batches=1; object_store).
    `local_threads`: torch thread counts the in-process engine runs at, each in every round; the ratios are
    against the fastest of them (the in-process path at its best setting on this box)."""
    from moeray.bench.engine import make_prompts
    from moeray.common import SamplingParams

    others = others or {}
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    res: dict[int, dict[str, list]] = {b: {"ray": [], "hidden": [], "same": [], **{k: [] for k in others},
                                           **{f"local{n}": [] for n in local_threads}} for b in batches}
    for _ in range(rounds):
        for b in batches:
            prompts = make_prompts(b, 64, vocab, 0)
            for k, d in others.items():
                t0 = time.perf_counter()
                d.generate(prompts, sp)
                res[b][k].append(b * output_len / (time.perf_counter() - t0))
            before = torch.get_num_threads()
            try:
                for n in local_threads:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    lo = [o.token_ids for o in local.generate(prompts, sp)]
                    res[b][f"local{n}"].append(b * output_len / (time.perf_counter() - t0))
            finally:
                torch.set_num_threads(before)
            st0 = dep.status()["gating"][0]["transport_stats"]
            t0 = time.perf_counter()
            ro = [o.token_ids for o in dep.generate(prompts, sp)]
            res[b]["ray"].append(b * output_len / (time.perf_counter() - t0))
            st1 = dep.status()["gating"][0]["transport_stats"]
            call = st1["call_s"] - st0["call_s"]
            blocked = st1["wait_s"] - st0["wait_s"]
            res[b]["hidden"].append(min(1.0, max(0.0, 1.0 - blocked / call)) if call > 0 else 0.0)
            res[b]["same"].append(lo == ro)
    out = {}
    for b, r in res.items():
        by_threads = {n: statistics.median(r[f"local{n}"]) for n in local_threads}
        best = max(by_threads, key=by_threads.get)
        ray_tps, loc_tps = statistics.median(r["ray"]), by_threads[best]
        out[b] = {"ray_tok_s": ray_tps, "local_tok_s": loc_tps, "local_threads": best,
                  "local_tok_s_by_threads": by_threads, "ray_over_local": ray_tps / loc_tps,
                  "hidden_fraction": statistics.median(r["hidden"]), "outputs_identical": all(r["same"]),
                  "ray_over_local_rounds": [a / c for a, c in zip(r["ray"], r[f"local{best}"], strict=True)]}
        for k in others:
            out[b][f"ray_{k}_over_local"] = statistics.median(r[k]) / loc_tps
            out[b][f"ray_over_ray_{k}_rounds"] = [a / c for a, c in zip(r["ray"], r[k], strict=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.dispatch", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "auto"],
                   help="serving dtype of both systems (auto: the serving default, bf16 where the CPU is fast at it)")
    p.add_argument("--micro-batches", type=int, default=0, help="ServeConfig.micro_batches of the Ray system")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--compare-mb1", action="store_true", help="also a micro_batches=1 deployment, same rounds")
    p.add_argument("--local-threads", type=int, default=os.cpu_count() or 1,
                   help="the in-process engine also runs end to end at this many torch threads (besides 1); ratios "
                        "are against the faster (default: every core)")
    p.add_argument("--compare-object-store", action="store_true",
                   help="also a tensor_transport=object_store deployment, same rounds")
    p.add_argument("--tensor-transport", default="auto", choices=["auto", "socket", "object_store", "nixl"],
                   help="the Ray system's ServeConfig.tensor_transport (auto: socket on CPUs); the layer probe times "
                        "socket and object_store on its actors either way, nixl also RDT (nixl on CPU actors: a "
                        "diagnostic, not the device path's speed)")
    p.add_argument("--expert-groups", type=int, default=4,
                   help="ServeConfig.num_expert_groups of the Ray system (4: the issue's setup; 2: one per core here)")
    p.add_argument("--out", type=Path, default=Path("bench/results/dispatch.json"))
    args = p.parse_args(argv)
    import ray

    from moeray.bench.engine import build_checkpoint
    from moeray.models.dtypes import resolve_dtype

    torch.set_num_threads(1)
    path = build_checkpoint(Path("bench/results/ckpt") if Path("bench").is_dir() else
                            Path(tempfile.mkdtemp()) / "ckpt")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="moeray-bench-dispatch")
    dep, local = build_systems(path, args.dtype, args.micro_batches, args.tensor_transport, args.expert_groups)
    try:
        dt = resolve_dtype(args.dtype, "cpu")
        res: dict[str, Any] = {"bench": "dispatch", "host": host_info(), "cpu_flags": _cpu_flags(),
                               "dtype": str(dt).removeprefix("torch."), "micro_batches": args.micro_batches,
                               "tensor_transport": args.tensor_transport, "expert_groups": args.expert_groups}
        print("[1/2] one MoE layer, piece by piece ...", flush=True)
        res["layer"] = layer_probe(dep, local, BATCHES, 15 if args.quick else 60, dt)
        for r in res["layer"]:
            extra = "".join(f" {k} {r[f'{k}_s'] * 1e3:.2f} ms" for k in ("socket", "object_store", "nixl")
                            if f"{k}_s" in r)
            print(f"T={r['tokens']:3d} actors={r['target_actors']} {r['transport']} - local = "
                  f"{r['overhead_s'] * 1e3:6.2f} ms = {r['overhead_over_fanout']:.2f} x Ray fanout "
                  f"{r['fanout_s'] * 1e3:.2f} ms | local {r['local_s'] * 1e3:.2f}{extra} socket fanout "
                  f"{r['socket_fanout_s'] * 1e3:.3f} ms | object_store-local / fanout "
                  f"{r['object_store_overhead_over_fanout']:.2f} | plan {r['plan_s'] * 1e3:.3f} pack "
                  f"{r['pack_s'] * 1e3:.3f} encode {r['encode_s'] * 1e3:.3f} combine {r['combine_s'] * 1e3:.3f} "
                  f"actor {r['actor_compute_s_per_call'] * 1e3:.3f} (cpu {r['actor_cpu_s_per_call'] * 1e3:.3f}) ms",
                  flush=True)
        if not args.skip_e2e:
            print("[2/2] end to end ...", flush=True)
            vocab = dep.model_cfg.vocab_size
            others = {}
            try:
                if args.compare_mb1:
                    others["mb1"] = build_systems(path, args.dtype, 1, args.tensor_transport, args.expert_groups)[0]
                if args.compare_object_store:
                    others["object_store"] = build_systems(path, args.dtype, args.micro_batches, "object_store",
                                                           args.expert_groups)[0]
                res["e2e"] = end_to_end(dep, local, BATCHES, args.output_len, 1 if args.quick else 3, vocab,
                                        others, tuple(sorted({1, args.local_threads})))
            finally:
                for d in others.values():
                    d.shutdown()
            for b, r in res["e2e"].items():
                alt = "".join(f"  {k}: ray/local {r[f'ray_{k}_over_local']:.2f}" for k in others)
                loc_txt = " / ".join(f"{v:.1f}" for v in r["local_tok_s_by_threads"].values())
                print(f"B={b:3d} ray {r['ray_tok_s']:7.1f} tok/s  local {loc_txt} at "
                      f"{'/'.join(map(str, r['local_tok_s_by_threads']))} threads  ray/best local "
                      f"{r['ray_over_local']:.2f}  hidden {r['hidden_fraction']:.2f}  identical "
                      f"{r['outputs_identical']}{alt}", flush=True)
        res["goals"] = {"overhead_over_fanout": 1.3, "ray_over_local": {1: 0.25, 16: 0.7, 64: 0.7}}
        write_json(args.out, res)
        print(f"wrote {args.out}")
    finally:
        dep.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
