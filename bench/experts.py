"""Grouped expert GEMM benchmark: `ExpertGroup.forward` as a fraction of this machine's roofline.

    python -m moeray.bench.experts [--quick] [--out bench/results/experts.json] [--threads 1]
    python -m moeray.bench.experts --packed [--num-experts 64]   # packed MXFP4/FP8 vs fp32/bf16 experts (tokens/s)

Workload per case: T routed tokens, each choosing K = 2 distinct experts uniformly at random out of E (all E held
by one group, one layer), so P = K * T (token, expert) pairs; SwiGLU experts of width D x I in fp32.
  FLOPs      6 * P * D * I          (gate_up: 2 * D * 2I per pair, down: 2 * I * D per pair)
  bytes      weights of the experts hit (3 * D * I * 4 each) + x read + out written (T * D * 4 each)
  AI         FLOPs / bytes
  roofline   min(peak, bandwidth * AI), with both measured in the same run:
               peak       fp32 FLOP/s of one large torch.mm (N x N x N)
               bandwidth  bytes/s of one large tensor copy (read + write counted)
  fraction   achieved FLOP/s / roofline (goal of issue 2: >= 0.7); `best frac` uses the fastest run of each
             probe instead of the median (the least disturbed runs)
Every time is the median of `--repeats` rounds; each round times the peaks and every case once, so that all of
them see the same background load. torch's thread count is fixed (default 1: on a shared machine, OpenMP
regions of 2 threads wait for whichever thread the OS has descheduled, and small ops then take milliseconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import finish, interleaved_times, machine_info, write_json
from moeray.experts.group import ExpertGroup

GOAL_FRACTION = 0.7  # issue 2


@dataclass(frozen=True, slots=True)
class Case:
    tokens: int  # T
    num_experts: int  # E
    top_k: int = 2  # K

    @property
    def num_pairs(self) -> int:
        return self.tokens * self.top_k


@dataclass(frozen=True, slots=True)
class Sizes:
    hidden: int = 1024  # D
    inter: int = 512  # I
    peak_n: int = 1024  # torch.mm size for the FLOP/s peak (its run time is close to the cases')
    copy_mib: int = 256  # tensor size for the bandwidth copy (well beyond the last-level cache)


FULL_CASES = tuple(Case(t, e) for t in (64, 512) for e in (8, 16, 64))
QUICK_CASES = tuple(Case(t, e) for t in (64, 512) for e in (8, 64))


# ---- the roofline ----------------------------------------------------------------------------------------
def peak_probes(sizes: Sizes) -> dict[str, tuple[Callable[[], Any], float]]:
    """name -> (fn, work per call): one large fp32 torch.mm (FLOPs) and one large copy (bytes, read + write)."""
    n = sizes.peak_n
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    numel = sizes.copy_mib * 2**20 // 4
    src, dst = torch.ones(numel), torch.zeros(numel)
    return {"matmul_flops_per_s": (lambda: torch.mm(a, b, out=c), 2.0 * n**3),
            "copy_bytes_per_s": (lambda: dst.copy_(src), 2.0 * src.nbytes)}


# ---- one case --------------------------------------------------------------------------------------------
def make_group(sizes: Sizes, num_experts: int, gen: torch.Generator, layer: int = 0) -> ExpertGroup:
    d, i = sizes.hidden, sizes.inter
    group = ExpertGroup(d, i)
    group.load(layer, {e: (torch.randn(2 * i, d, generator=gen) * d**-0.5, torch.randn(d, i, generator=gen) * i**-0.5)
                       for e in range(num_experts)})
    return group


def make_routing(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform top-K routing -> pair_rows [P], expert_ids [P], weights [P] (pairs in token order)."""
    t, k = case.tokens, case.top_k
    expert_ids = torch.rand(t, case.num_experts, generator=gen).topk(k, dim=-1).indices  # [T, K], distinct per row
    weights = torch.rand(t, k, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    pair_rows = torch.arange(t).repeat_interleave(k)  # [P]
    return pair_rows, expert_ids.reshape(-1), weights.reshape(-1)


def case_cost(case: Case, sizes: Sizes, expert_ids: torch.Tensor) -> dict[str, float]:
    d, i = sizes.hidden, sizes.inter
    num_hit = int(expert_ids.unique().numel())
    flops = 6 * case.num_pairs * d * i
    weight_bytes = num_hit * 3 * d * i * 4
    act_bytes = 2 * case.tokens * d * 4
    return {"experts_hit": num_hit, "flops": flops, "weight_bytes": weight_bytes,
            "bytes": weight_bytes + act_bytes, "intensity_flops_per_byte": flops / (weight_bytes + act_bytes)}


def case_probe(case: Case, group: ExpertGroup, sizes: Sizes, seed: int) -> tuple[Callable[[], Any], dict[str, float]]:
    """(one ExpertGroup.forward call on this case's routing, its cost)."""
    gen = torch.Generator().manual_seed(seed + 7919 * case.tokens + case.num_experts)
    x = torch.randn(case.tokens, sizes.hidden, generator=gen)
    pair_rows, expert_ids, weights = make_routing(case, gen)
    return (lambda: group.forward(0, x, pair_rows, expert_ids, weights)), case_cost(case, sizes, expert_ids)


def roofline(cost: dict[str, float], peaks: dict[str, float]) -> tuple[float, str]:
    """(min(matmul peak, bandwidth * AI), which of the two binds)."""
    mem_roof = peaks["copy_bytes_per_s"] * cost["intensity_flops_per_byte"]
    if peaks["matmul_flops_per_s"] <= mem_roof:
        return peaks["matmul_flops_per_s"], "compute"
    return mem_roof, "memory"


def summarise(case: Case, cost: dict[str, float], times: list[float], peaks: dict[str, float],
              best_peaks: dict[str, float]) -> dict[str, Any]:
    """One row: median-based figures (the headline) and best-of figures (the least disturbed runs)."""
    median_s = statistics.median(times)
    roof, bound = roofline(cost, peaks)
    best_roof, _ = roofline(cost, best_peaks)
    achieved, best = cost["flops"] / median_s, cost["flops"] / min(times)
    return {**asdict(case), "pairs": case.num_pairs, **cost, "median_s": median_s, "times_s": times,
            "achieved_flops_per_s": achieved, "roofline_flops_per_s": roof, "bound": bound,
            "fraction_of_roofline": achieved / roof,
            "best_flops_per_s": best, "best_roofline_flops_per_s": best_roof,
            "best_fraction_of_roofline": best / best_roof}


def run(cases: tuple[Case, ...], sizes: Sizes, threads: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """The whole benchmark: the peaks and every case timed in interleaved rounds. Restores torch's thread count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            info = machine_info()
            peaks_work = peak_probes(sizes)
            gen = torch.Generator().manual_seed(seed)
            groups = {e: make_group(sizes, e, gen) for e in sorted({c.num_experts for c in cases})}
            cases_probe = {c: case_probe(c, groups[c.num_experts], sizes, seed) for c in cases}
            probes = {name: fn for name, (fn, _) in peaks_work.items()}
            probes.update({f"case {c.tokens}x{c.num_experts}": fn for c, (fn, _) in cases_probe.items()})
            times = interleaved_times(probes, repeats)
    finally:
        torch.set_num_threads(prev)
    peaks = {name: work / statistics.median(times[name]) for name, (_, work) in peaks_work.items()}
    best_peaks = {name: work / min(times[name]) for name, (_, work) in peaks_work.items()}
    rows = [summarise(c, cost, times[f"case {c.tokens}x{c.num_experts}"], peaks, best_peaks)
            for c, (_, cost) in cases_probe.items()]
    fractions = [r["fraction_of_roofline"] for r in rows]
    return {"bench": "experts", "machine": info, "threads": threads, "repeats": repeats, "sizes": asdict(sizes),
            "dtype": "float32", "peaks": peaks, "best_peaks": best_peaks, "rows": rows, "goal_fraction": GOAL_FRACTION,
            "min_fraction": min(fractions), "cases_meeting_goal": sum(f >= GOAL_FRACTION for f in fractions)}


def format_table(result: dict[str, Any]) -> str:
    p, b, s = result["peaks"], result["best_peaks"], result["sizes"]
    lines = [
        f"grouped expert GEMM, D={s['hidden']} I={s['inter']} fp32, {result['threads']} thread(s), median of "
        f"{result['repeats']} interleaved rounds; load avg {result['machine']['load_avg_1m']}",
        f"peaks (median / best): matmul {p['matmul_flops_per_s'] / 1e9:.1f} / {b['matmul_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s, copy {p['copy_bytes_per_s'] / 1e9:.1f} / {b['copy_bytes_per_s'] / 1e9:.1f} GB/s",
        f"{'tokens':>6}{'pairs':>6}{'E':>4}{'hit':>5}{'AI f/B':>8}{'bound':>8}{'ms':>9}{'GFLOP/s':>9}"
        f"{'roof':>8}{'frac':>7}{'best frac':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['tokens']:>6}{r['pairs']:>6}{r['num_experts']:>4}{r['experts_hit']:>5}"
            f"{r['intensity_flops_per_byte']:>8.1f}{r['bound']:>8}{r['median_s'] * 1e3:>9.2f}"
            f"{r['achieved_flops_per_s'] / 1e9:>9.1f}{r['roofline_flops_per_s'] / 1e9:>8.1f}"
            f"{r['fraction_of_roofline']:>7.2f}{r['best_fraction_of_roofline']:>10.2f}")
    lines.append(f"goal: >= {result['goal_fraction']} of roofline (median) -> {result['cases_meeting_goal']}/"
                 f"{len(result['rows'])} cases (min {result['min_fraction']:.2f})")
    return "\n".join(lines)


# ---- packed (quantized) experts vs unquantized, in tokens/s (issue 14) -------------------------------------
PACKED_TOKENS = (1, 16, 64, 512)
PACKED_GOALS = {16: 1.0, 512: 0.5}  # tokens <= key: packed tokens/s >= goal x the unquantized experts'


def packed_groups(sizes: Sizes, num_experts: int, gen: torch.Generator, layer: int = 0) -> dict[str, Any]:
    """name -> a group holding the same random experts: fp32 and bf16 ExpertGroups (the unquantized peers) and
    MXFP4 / FP8 (128x128 blocks) PackedExpertGroups computing in fp32 and in bf16 (the packed weights shared)."""
    from moeray.experts.quant_formats import quantize_fp8_blocks, quantize_mxfp4
    from moeray.experts.quantized import PackedExpert, PackedExpertGroup, PackedWeight

    d, i = sizes.hidden, sizes.inter
    raw = {e: [torch.randn(i, d, generator=gen) * d**-0.5, torch.randn(i, d, generator=gen) * d**-0.5,
               torch.randn(d, i, generator=gen) * i**-0.5] for e in range(num_experts)}
    groups: dict[str, Any] = {}
    for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        g = ExpertGroup(d, i, dtype=dt)
        g.load(layer, {e: (torch.cat(w[:2]), w[2]) for e, w in raw.items()})
        groups[label] = g
    packers = {"mxfp4": (lambda w: PackedWeight(*quantize_mxfp4(w)), None),
               "fp8": (lambda w: PackedWeight(*quantize_fp8_blocks(w, (128, 128))), (128, 128))}
    for fmt, (pack, block) in packers.items():
        experts = {e: PackedExpert(*[pack(w) for w in ws]) for e, ws in raw.items()}
        for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            g = PackedExpertGroup(d, i, dtype=dt, fmt=fmt, block=block)
            g.load(layer, experts)
            groups[f"{fmt}/{label}"] = g
    return groups


def timed_rounds(probes: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`interleaved_times`, also recording each call's CPU time on the calling thread (torch runs one thread
    here and numba's serial kernels run on it too): on a shared machine, time the OS gave to others is in the
    wall clock but not in the CPU time. -> (name -> wall times, name -> CPU times), seconds."""
    wall: dict[str, list[float]] = {name: [] for name in probes}
    cpu: dict[str, list[float]] = {name: [] for name in probes}
    for r in range(warmup + repeats):
        for name, fn in probes.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if r >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
    return wall, cpu


def _bf16_flags() -> list[str]:
    """The CPU flags that decide the dtypes here (bf16 tiles and the `auto` serving dtype), as cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})


def run_packed(tokens: tuple[int, ...], sizes: Sizes, num_experts: int, threads: int, repeats: int,
               seed: int = 0) -> dict[str, Any]:
    """Tokens/s of every group of `packed_groups` at each routed-token count (top-2 of `num_experts`), all timed
    in the same interleaved rounds; ratios against the fp32 and bf16 ExpertGroups of the same run."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            info = machine_info()
            gen = torch.Generator().manual_seed(seed)
            groups = packed_groups(sizes, num_experts, gen)
            probes, work = {}, {}
            for t in tokens:
                case = Case(t, num_experts)
                x = torch.randn(t, sizes.hidden, generator=gen)
                pair_rows, expert_ids, weights = make_routing(case, gen)
                for name, g in groups.items():
                    probes[f"{name} T={t}"] = (lambda g=g, x=x, r=pair_rows, e=expert_ids, w=weights:
                                               g.forward(0, x, r, e, w))
                work[t] = int(expert_ids.unique().numel())
            times, cpu_times = timed_rounds(probes, repeats, warmup=2)
    finally:
        torch.set_num_threads(prev)
    rows = []
    for t in tokens:
        med = {name: statistics.median(times[f"{name} T={t}"]) for name in groups}
        best = {name: min(times[f"{name} T={t}"]) for name in groups}
        cpu = {name: statistics.median(cpu_times[f"{name} T={t}"]) for name in groups}
        row = {"tokens": t, "experts_hit": work[t], "tokens_per_s": {n: t / s for n, s in med.items()},
               "median_s": med, "best_s": best, "cpu_median_s": cpu}
        for fmt in ("mxfp4", "fp8"):
            for label in ("fp32", "bf16"):
                row[f"{fmt}/{label}_vs_{label}"] = med[label] / med[f"{fmt}/{label}"]
                row[f"best {fmt}/{label}_vs_{label}"] = best[label] / best[f"{fmt}/{label}"]
                row[f"cpu {fmt}/{label}_vs_{label}"] = cpu[label] / cpu[f"{fmt}/{label}"]
        rows.append(row)
    return {"bench": "experts_packed", "machine": {**info, "cpu_flags": _bf16_flags()}, "threads": threads,
            "repeats": repeats,
            "sizes": asdict(sizes), "num_experts": num_experts,
            "weight_bytes_per_expert": {n: g.nbytes() // num_experts for n, g in groups.items()},
            "goals": {f"tokens<={k}": v for k, v in PACKED_GOALS.items()}, "rows": rows}


def format_packed(result: dict[str, Any]) -> str:
    s, bpe = result["sizes"], result["weight_bytes_per_expert"]
    names = list(bpe)
    lines = [f"packed vs unquantized experts, D={s['hidden']} I={s['inter']}, top-2 of {result['num_experts']}, "
             f"{result['threads']} thread(s), median of {result['repeats']} interleaved rounds; load avg "
             f"{result['machine']['load_avg_1m']}",
             "bytes per expert: " + ", ".join(f"{n} {bpe[n] / 2**20:.2f} MiB" for n in names),
             f"{'tokens':>6} " + "".join(f"{n + ' tok/s':>18}" for n in names)]
    for r in result["rows"]:
        lines.append(f"{r['tokens']:>6} " + "".join(f"{r['tokens_per_s'][n]:>18.1f}" for n in names))
    lines.append(f"{'tokens':>6} " + "".join(f"{k:>21}" for k in ("mxfp4/fp32 vs fp32", "mxfp4/bf16 vs bf16",
                                                                     "fp8/fp32 vs fp32", "fp8/bf16 vs bf16")))
    keys = ("mxfp4/fp32_vs_fp32", "mxfp4/bf16_vs_bf16", "fp8/fp32_vs_fp32", "fp8/bf16_vs_bf16")
    for r in result["rows"]:
        lines.append(f"{r['tokens']:>6} " + "".join(f"{r[k]:>11.2f}x ({r['best ' + k]:.2f}x)" for k in keys))
    lines.append("ratios: median-based (best-of-rounds in parentheses: the least disturbed runs)")
    lines.append(f"{'tokens':>6} " + "".join(f"{k:>21}" for k in ("CPU-time ratios: mxfp4/fp32", "mxfp4/bf16",
                                                                     "fp8/fp32", "fp8/bf16")))
    for r in result["rows"]:
        lines.append(f"{r['tokens']:>6} " + "".join(f"{r['cpu ' + k]:>20.2f}x" for k in keys))
    lines.append(f"cpu flags: {' '.join(result['machine']['cpu_flags']) or 'unknown'}")
    lines.append("goals (issue 14): packed >= 1.0x the unquantized experts at <= 16 tokens, >= 0.5x at 512")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.experts", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 cases, 3 rounds, a smaller copy probe")
    p.add_argument("--out", type=Path, default=Path("bench/results/experts.json"), help="JSON results path")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for the whole run)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed", action="store_true", help="packed MXFP4/FP8 experts vs fp32/bf16 in tokens/s instead")
    p.add_argument("--num-experts", type=int, default=64, help="experts held (--packed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes(args.hidden, args.inter, copy_mib=64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 15)
    if args.packed:
        result = run_packed(PACKED_TOKENS, sizes, args.num_experts, args.threads, repeats, args.seed)
        print(format_packed(result))
        write_json(args.out.with_name(args.out.stem + "_packed.json"), result)
        return 0
    result = run(QUICK_CASES if args.quick else FULL_CASES, sizes, args.threads, repeats, args.seed)
    return finish(args.out, result, format_table(result))


if __name__ == "__main__":
    sys.exit(main())
