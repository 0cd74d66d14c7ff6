"""The serving benchmark's plots: TTFT/ITL CDFs per system and rate, throughput and goodput vs offered rate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeray.bench.serving_metrics import SLO, RequestResult, _rate

COLORS = {"moeray": "tab:blue", "transformers": "tab:orange", "vllm": "tab:green"}


def plot(runs: dict[str, dict[float, list[RequestResult]]], summaries: list[dict[str, Any]], slo: SLO,
         out: Path, title: str) -> list[Path]:
    """The latency CDFs and throughput-vs-rate PNGs, named after the JSON `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out.with_name(f"{out.stem}_latency_cdf.png"), out.with_name(f"{out.stem}_throughput.png")]
    _plot_cdfs(plt, runs, slo, title, paths[0])
    _plot_throughput(plt, runs, summaries, slo, title, paths[1])
    return paths


def _plot_cdfs(plt, runs, slo: SLO, title: str, path: Path) -> None:
    """Small multiples: a column per offered rate, TTFT on top and ITL below, a line per system."""
    rates = sorted({rate for by_rate in runs.values() for rate in by_rate})
    fig, axes = plt.subplots(2, len(rates), figsize=(3.4 * len(rates) + 1, 6.4), sharex="row", sharey=True,
                             squeeze=False)
    for col, rate in enumerate(rates):
        for system, by_rate in runs.items():
            done = [r for r in by_rate.get(rate, []) if r.ok]
            series = [[r.ttft_s * 1000 for r in done], [max(x * 1000, 1e-2) for r in done for x in r.itls_s]]
            for row, values in enumerate(series):
                if values:
                    xs = sorted(values)
                    axes[row][col].step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                                        color=COLORS.get(system), label=system)
        axes[0][col].set_title(f"offered {_rate(rate)} req/s")
        for row, (name, limit) in enumerate([("TTFT", slo.ttft_ms), ("inter-token latency", slo.itl_ms)]):
            ax = axes[row][col]
            ax.axvline(limit, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(f"{name} (ms)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[1][0].set_ylabel("fraction of token gaps")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Latency CDFs (further left = faster; dashed = SLO)\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(plt, runs, summaries, slo: SLO, title: str, path: Path) -> None:
    """Served requests/s and goodput (left) and output tokens/s (right) against the offered rate."""
    rates = sorted({s["rate"] for s in summaries})
    inf_x = max((r for r in rates if not math.isinf(r)), default=1.0) * 2  # where "inf" sits on the axis
    x_of = lambda rate: inf_x if math.isinf(rate) else rate  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in runs:
        points = sorted((x_of(s["rate"]), s["summary"]) for s in summaries
                        if s["system"] == system and s["summary"].get("completed"))
        xs, c = [x for x, _ in points], COLORS.get(system)
        axes[0].plot(xs, [s["request_throughput"] for _, s in points], marker="o", color=c, label=f"{system} served")
        axes[0].plot(xs, [s["goodput"] for _, s in points], marker="x", linestyle="--", color=c,
                     label=f"{system} goodput")
        axes[1].plot(xs, [s["output_throughput"] for _, s in points], marker="o", color=c, label=system)
    finite = [r for r in rates if not math.isinf(r)]
    axes[0].plot(finite, finite, color="grey", linewidth=0.8, linestyle=":", label="offered")
    for ax, ylabel in zip(axes, ["requests / s", "output tokens / s"]):
        ax.set_xscale("log")
        ax.set_xticks([x_of(r) for r in rates], [_rate(r) for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("offered request rate (req/s, Poisson; inf = all at once)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"served and goodput (TTFT <= {slo.ttft_ms:g} ms, mean ITL <= {slo.itl_ms:g} ms)")
    axes[1].set_title("output token throughput")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


