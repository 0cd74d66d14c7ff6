"""The serving benchmark's metrics (pure): per-request timelines, percentiles, per-run summaries, goodput,
ratios between systems, the table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# Metrics (pure)


@dataclass(slots=True)
class RequestResult:
    """One request's timeline, in seconds from the start of the run."""

    arrival_s: float
    chunk_times_s: list[float] = field(default_factory=list)  # each streamed chunk that carried tokens
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.arrival_s

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; 0 for a single-token answer."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def e2el_s(self) -> float:
        return self.chunk_times_s[-1] - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    if not values_s:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms), "median": percentile(ms, 50), "p99": percentile(ms, 99)}


@dataclass(frozen=True, slots=True)
class SLO:
    """A request meets it when its TTFT and its mean inter-token latency (TPOT) are both within bounds."""

    ttft_ms: float
    itl_ms: float

    def met(self, r: RequestResult) -> bool:
        return r.ok and r.ttft_s * 1000.0 <= self.ttft_ms and r.tpot_s * 1000.0 <= self.itl_ms


def summarize(results: Sequence[RequestResult], slo: SLO) -> dict[str, Any]:
    """Throughput, latency statistics and goodput of one (system, rate) run."""
    done = [r for r in results if r.ok]
    if not done:
        return {"completed": 0, "failed": len(results), "errors": sorted({r.error or "no tokens" for r in results})}
    start = min(r.arrival_s for r in results)
    duration = max(r.chunk_times_s[-1] for r in done) - start
    num_out = sum(r.output_tokens for r in done)
    num_good = sum(slo.met(r) for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_throughput": num_out / duration if duration > 0 else math.nan,
        "total_output_tokens": num_out,
        "tokens_per_chunk": num_out / sum(len(r.chunk_times_s) for r in done),
        "ttft_ms": stats_ms([r.ttft_s for r in done]),
        "itl_ms": stats_ms([x for r in done for x in r.itls_s]),
        "tpot_ms": stats_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "e2el_ms": stats_ms([r.e2el_s for r in done]),
        "goodput": num_good / duration if duration > 0 else math.nan,
        "slo_attainment": num_good / len(results),
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["system", "rate", "done", "req/s", "out tok/s", "TTFT med", "TTFT p99", "TPOT med", "ITL med",
               "ITL p99", "goodput"]
    lines = [headers]
    for row in rows:
        s = row["summary"]
        if not s.get("completed"):
            lines.append([row["system"], _rate(row["rate"]), f"0/{s.get('failed', 0)}", *["-"] * 8])
            continue
        lines.append([row["system"], _rate(row["rate"]), f"{s['completed']}/{s['completed'] + s['failed']}",
                      f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                      f"{s['ttft_ms']['median']:.0f}", f"{s['ttft_ms']['p99']:.0f}", f"{s['tpot_ms']['median']:.1f}",
                      f"{s['itl_ms']['median']:.1f}", f"{s['itl_ms']['p99']:.1f}", f"{s['goodput']:.2f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    out = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + ("\n(latencies in ms; rate and goodput in req/s; ITL is per streamed chunk, TPOT per "
                             "token: they differ when a server sends several tokens in one chunk)")


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


