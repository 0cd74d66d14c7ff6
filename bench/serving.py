"""Serving benchmark in the manner of vLLM's benchmark_serving: one workload, several systems, same run.

    python -m moeray.bench.serving [--quick] [--model DIR] [--rates 1,4,inf] [--num-prompts 40] ...
    moeray bench [--quick] ...

Method
1. Workload (per offered rate, seeded): `num_prompts` requests with Poisson arrivals (exponential gaps of mean
   1/rate; rate inf sends all at once), prompt and output lengths drawn uniformly from
   [len * (1 - range_ratio), len * (1 + range_ratio)], prompts of random token ids, greedy, `ignore_eos` so every
   system generates exactly the drawn number of tokens.
2. Systems, one after the other, each warmed up first:
   - moeray: `deploy()` in this process (the expert-group and gating actors on a private local Ray, or on the
     cluster at $RAY_ADDRESS), its OpenAI HTTP API (`serve_http`) on this event loop, driven over HTTP by the
     streaming client below, as a user would.
   - transformers: `generate()` in this process, static batching: whenever the model is free, every request that
     has arrived (up to --hf-max-batch) is left-padded into one `generate` call; requests arriving meanwhile wait
     for the next call. Token times come from a per-step hook (a StoppingCriteria that only reads the clock),
     i.e. as if each request's tokens were streamed as they are made.
   - vllm: `vllm serve` from its own venv (--vllm-python) as a subprocess, the same streaming client. Skipped
     with a reason in the JSON when that venv is missing, and under --quick (its CPU start-up alone is minutes).
3. Per request: TTFT = first streamed token - arrival; ITL = gaps between streamed chunks (as in vLLM's script;
   a server that coalesces tokens under load sends several per chunk, and then ITL shows the bursts while TPOT
   does not; `tokens_per_chunk` in the JSON says how much); TPOT = (last - first) / (tokens - 1). Per rate:
   request and output-token throughput over the time from the first arrival to the last token; TTFT, ITL, TPOT
   and end-to-end latency (mean, median, p99); goodput = requests per second with both TTFT <= --slo-ttft-ms and
   TPOT <= --slo-itl-ms (vLLM's per-request definition).

Out: JSON (--out, default bench/results/serving.json) and beside it, named after it, `serving_latency_cdf.png`
(TTFT and ITL CDFs per system and rate), `serving_throughput.png` (throughput and goodput vs offered rate) and
`serving_vllm.log` (vLLM's server log); a table on stdout.
Heavy imports (torch, ray, transformers, httpx, matplotlib) happen inside functions: `moeray bench --help` is cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeray.bench.serving_metrics import (  # noqa: F401 - re-exported: the benchmark's public names
    SLO,
    RequestResult,
    _rate,
    format_table,
    percentile,
    stats_ms,
    summarize,
)
from moeray.bench.serving_plots import plot  # noqa: F401
from moeray.bench.serving_systems import (  # noqa: F401
    DEFAULT_VLLM_PYTHON,
    FALLBACK_CACHE,
    SERVED_NAME,
    MoeraySystem,
    TransformersSystem,
    VllmSystem,
    model_facts,
    resolve_model,
)
from moeray.bench.serving_workload import BenchRequest, draw_length, make_workload, poisson_arrivals  # noqa: F401

DEFAULT_OUT = Path("bench/results/serving.json")


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Plan:
    rates: list[float]
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float
    seed: int
    slo: SLO
    systems: list[str]


QUICK = {"rates": "2,8,inf", "num_prompts": 16, "input_len": 64, "output_len": 32}
FULL = {"rates": "1,2,4,8,inf", "num_prompts": 40, "input_len": 128, "output_len": 64}


def make_plan(args: argparse.Namespace) -> Plan:
    preset = QUICK if args.quick else FULL
    try:
        rates = [float(x) for x in (args.rates or preset["rates"]).split(",")]
    except ValueError:
        raise ValueError(f"--rates: expected numbers separated by commas (or inf), got {args.rates!r}") from None
    if any(not (r > 0) for r in rates):
        raise ValueError(f"--rates: every rate must be > 0 (or inf), got {rates}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"moeray", "transformers", "vllm"}
    if unknown:
        raise ValueError(f"--systems: unknown {sorted(unknown)}; choose from moeray, transformers, vllm")
    return Plan(rates=rates, num_prompts=args.num_prompts or preset["num_prompts"],
                input_len=args.input_len or preset["input_len"], output_len=args.output_len or preset["output_len"],
                range_ratio=args.range_ratio, seed=args.seed, slo=SLO(args.slo_ttft_ms, args.slo_itl_ms),
                systems=systems)


def build_systems(plan: Plan, args: argparse.Namespace, model_dir: Path, max_model_len: int):
    """(systems to run, {name: reason} of those skipped)."""
    systems, skipped = [], {}
    for name in plan.systems:
        if name == "moeray":
            systems.append(MoeraySystem(model_dir, args.num_expert_groups))
        elif name == "transformers":
            systems.append(TransformersSystem(model_dir, args.hf_max_batch, args.hf_threads or (os.cpu_count() or 1)))
        elif not args.vllm_python.exists():
            skipped[name] = f"skipped: no vLLM venv at {args.vllm_python} (pass --vllm-python)"
        elif args.quick and not args.with_vllm:
            skipped[name] = "skipped: --quick (vLLM's CPU start-up alone takes minutes; add --with-vllm to include it)"
        else:
            log = args.out.with_name(f"{args.out.stem}_vllm.log")
            systems.append(VllmSystem(args.vllm_python, model_dir, max_model_len, log, args.vllm_start_timeout,
                                      args.vllm_dtype))
    return systems, skipped


async def run_system(system, workloads: dict[float, list[BenchRequest]], warmup: list[BenchRequest]):
    """Start, warm up, run every rate, stop (also after a failure). Returns ({rate: results}, start seconds)."""
    by_rate = {}
    try:
        t0 = time.monotonic()
        await system.start()
        start_s = time.monotonic() - t0
        await system.run(warmup, lambda: None)
        for rate, workload in workloads.items():
            with progress(len(workload), f"{system.name} @ {_rate(rate)} req/s") as bar:
                by_rate[rate] = await system.run(workload, bar.update)
    finally:
        await system.stop()
    return by_rate, start_s


class _Counter:
    """A printed counter, for when tqdm is not installed."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc) -> None:
        print(file=sys.stderr)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t_begin = time.monotonic()
    plan = make_plan(args)
    model_dir, model_note = resolve_model(args.model)
    print(f"model: {model_dir} ({model_note})", flush=True)
    facts = model_facts(model_dir)
    vocab = _tokenizer_vocab(model_dir) or facts.get("vocab_size", 2)
    max_model_len = min(int(facts.get("max_position_embeddings", 2048)), 4096)
    token_range = (2, vocab)  # ids 0 and 1 are often pad / eos; any id decodes
    workloads = {rate: make_workload(plan.num_prompts, rate, plan.input_len, plan.output_len, plan.range_ratio,
                                     token_range, plan.seed) for rate in plan.rates}
    warmup = make_workload(2, math.inf, plan.input_len, 4, 0.0, token_range, plan.seed + 99)
    systems, skipped = build_systems(plan, args, model_dir, max_model_len)

    runs: dict[str, dict[float, list[RequestResult]]] = {}
    report: dict[str, Any] = {name: {"status": reason} for name, reason in skipped.items()}
    for system in systems:
        print(f"{system.name}: starting", flush=True)
        try:
            runs[system.name], start_s = await run_system(system, workloads, warmup)
            report[system.name] = {"status": "ok", "start_s": round(start_s, 1), **system.info}
        except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' numbers
            report[system.name] = {"status": f"failed: {type(e).__name__}: {e}", **system.info}
            print(f"{system.name}: failed: {e}", file=sys.stderr, flush=True)

    summaries = [{"system": name, "rate": rate, "summary": summarize(results, plan.slo),
                  "requests": [_request_row(r) for r in results]}
                 for name, by_rate in runs.items() for rate, results in by_rate.items()]
    return {"plan": plan, "model_dir": model_dir, "model_note": model_note, "facts": facts, "runs": runs,
            "systems": report, "summaries": summaries, "wall_s": time.monotonic() - t_begin}


def _request_row(r: RequestResult) -> dict[str, Any]:
    if not r.ok:
        return {"arrival_s": round(r.arrival_s, 4), "error": r.error}
    return {"arrival_s": round(r.arrival_s, 4), "ttft_ms": round(r.ttft_s * 1000, 2),
            "tpot_ms": round(r.tpot_s * 1000, 2), "e2el_ms": round(r.e2el_s * 1000, 2),
            "output_tokens": r.output_tokens, "num_chunks": len(r.chunk_times_s)}


def _tokenizer_vocab(model_dir: Path) -> int | None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size()


def ratios(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """moeray / peer at each rate, for output throughput and median TTFT / ITL (> 1: moeray larger)."""
    by = {(s["system"], s["rate"]): s["summary"] for s in summaries}
    out: dict[str, dict[str, float]] = {}
    for (system, rate), peer in by.items():
        mine = by.get(("moeray", rate))
        if system == "moeray" or not mine or not mine.get("completed") or not peer.get("completed"):
            continue
        out[f"moeray/{system}@{_rate(rate)}"] = {
            "output_throughput": mine["output_throughput"] / peer["output_throughput"],
            "ttft_median": mine["ttft_ms"]["median"] / peer["ttft_ms"]["median"],
            "itl_median": mine["itl_ms"]["median"] / peer["itl_ms"]["median"],
        }
    return out


def to_json(result: dict[str, Any], args: argparse.Namespace, pngs: list[Path]) -> dict[str, Any]:
    plan: Plan = result["plan"]
    rows = [{**s, "rate": _rate(s["rate"])} for s in result["summaries"]]
    return {
        "benchmark": "serving",
        "quick": bool(args.quick),
        "model": {"path": str(result["model_dir"]), "source": result["model_note"], **result["facts"]},
        "workload": {"rates_req_per_s": [_rate(r) for r in plan.rates], "num_prompts_per_rate": plan.num_prompts,
                     "input_len": plan.input_len, "output_len": plan.output_len, "range_ratio": plan.range_ratio,
                     "seed": plan.seed, "arrivals": "poisson", "prompts": "random token ids", "sampling": "greedy",
                     "ignore_eos": True},
        "slo": {"ttft_ms": plan.slo.ttft_ms, "itl_ms": plan.slo.itl_ms,
                "goodput": "requests/s with TTFT <= ttft_ms and mean inter-token latency (TPOT) <= itl_ms"},
        "systems": result["systems"],
        "results": rows,
        "ratios": ratios(result["summaries"]),
        "plots": [str(p) for p in pngs],
        "machine": _machine(),
        "wall_s": round(result["wall_s"], 1),
    }


def _machine() -> dict[str, Any]:
    from moeray.bench.common import host_info

    info = host_info()
    info["load_avg_1m_at_end"] = info.pop("load_avg_1m")
    return info


def _json_safe(obj):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by `moeray bench` and `python -m moeray.bench.serving`)."""
    p.add_argument("--quick", action="store_true",
                   help=f"small workload, under 3 minutes: {QUICK} (default {FULL}); skips vLLM")
    p.add_argument("--model", help="model folder (default: the bundled demo model, else a tiny built one)")
    p.add_argument("--rates", help="offered request rates, comma-separated req/s; inf = all at once")
    p.add_argument("--num-prompts", type=int, help="requests per rate")
    p.add_argument("--input-len", type=int, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO on time to first token")
    p.add_argument("--slo-itl-ms", type=float, default=100.0,
                   help="goodput SLO on a request's mean inter-token latency (TPOT)")
    p.add_argument("--systems", default="moeray,transformers,vllm", help="which systems to run")
    p.add_argument("--num-expert-groups", type=int, default=2, help="moeray's expert-group actors")
    p.add_argument("--hf-max-batch", type=int, default=64, help="transformers: requests per generate() at most")
    p.add_argument("--hf-threads", type=int, help="transformers: torch threads (default: all cores)")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="python of the vLLM venv")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0, help="seconds to wait for vLLM to start")
    p.add_argument("--with-vllm", action="store_true", help="include vLLM even under --quick")
    p.add_argument("--vllm-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="vLLM's dtype (auto: bfloat16 on CPUs with AMX, its best setting there; else float32)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNGs go beside it")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write JSON and PNGs, print the table. Returns the exit code."""
    result = asyncio.run(run_benchmark(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_name = result["model_dir"].name
    title = (f"{model_name} | {result['plan'].num_prompts} requests per rate, in ~{result['plan'].input_len} / "
             f"out ~{result['plan'].output_len} tokens | {os.cpu_count()} cores")
    pngs = []
    if result["runs"]:
        pngs = plot(result["runs"], result["summaries"], result["plan"].slo, args.out, title)
    data = to_json(result, args, pngs)
    args.out.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    print()
    print(format_table(result["summaries"]))
    for name, info in result["systems"].items():
        if info["status"] != "ok":
            print(f"{name}: {info['status']}")
    print(f"wrote {args.out}" + "".join(f", {p}" for p in pngs))
    print(f"wall time {result['wall_s']:.0f} s")
    ok = any(info["status"] == "ok" for info in result["systems"].values())
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeray.bench.serving", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


