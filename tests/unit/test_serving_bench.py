"""The serving benchmark's pure parts: the seeded workload, percentiles, per-run summaries, goodput."""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest

from moeray.bench.serving import (
    SLO,
    RequestResult,
    _json_safe,
    add_arguments,
    draw_length,
    format_table,
    make_plan,
    make_workload,
    percentile,
    poisson_arrivals,
    ratios,
    summarize,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Workload


def test_poisson_arrivals_repeat_with_the_seed_and_start_at_zero():
    a = poisson_arrivals(50, 4.0, random.Random(7))
    assert a == poisson_arrivals(50, 4.0, random.Random(7))
    assert a != poisson_arrivals(50, 4.0, random.Random(8))
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))


def test_poisson_gaps_have_mean_one_over_rate_and_are_exponential():
    rate = 5.0
    a = poisson_arrivals(20001, rate, random.Random(0))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean


def test_infinite_rate_sends_everything_at_once():
    assert poisson_arrivals(4, math.inf, random.Random(0)) == [0.0] * 4
    assert poisson_arrivals(0, 1.0, random.Random(0)) == []


def test_lengths_stay_in_range():
    rng = random.Random(0)
    lengths = [draw_length(100, 0.5, rng) for _ in range(2000)]
    assert min(lengths) >= 50 and max(lengths) <= 150
    assert min(lengths) < 55 and max(lengths) > 145  # the whole range is used
    assert draw_length(1, 0.9, rng) == 1


def test_workload_is_the_same_at_every_rate_except_arrivals():
    slow = make_workload(20, 1.0, 32, 16, 0.5, (2, 100), seed=3)
    fast = make_workload(20, math.inf, 32, 16, 0.5, (2, 100), seed=3)
    assert [r.prompt_ids for r in slow] == [r.prompt_ids for r in fast]
    assert [r.max_tokens for r in slow] == [r.max_tokens for r in fast]
    assert all(r.arrival_s == 0.0 for r in fast) and slow[-1].arrival_s > 0
    assert all(2 <= t < 100 for r in slow for t in r.prompt_ids)
    assert all(16 <= len(r.prompt_ids) <= 48 and 8 <= r.max_tokens <= 24 for r in slow)
    assert make_workload(20, 1.0, 32, 16, 0.5, (2, 100), seed=4)[0].prompt_ids != slow[0].prompt_ids


# ---------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [random.Random(q).random() for _ in range(37)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


def result(arrival: float, times: list[float]) -> RequestResult:
    return RequestResult(arrival, chunk_times_s=times, output_tokens=len(times))


def test_request_timings():
    r = result(1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft_s == pytest.approx(0.5)
    assert r.itls_s == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot_s == pytest.approx(0.2)
    assert r.e2el_s == pytest.approx(1.1)
    assert result(0.0, [0.3]).tpot_s == 0.0


def test_summary_throughput_latency_and_goodput():
    results = [
        result(0.0, [0.1, 0.2, 0.3]),  # TTFT 100 ms, TPOT 100 ms: meets the SLO
        result(1.0, [1.5, 1.55, 1.6, 1.65, 1.7]),  # TTFT 500 ms: misses it
        result(1.0, [1.2, 2.0]),  # TPOT 800 ms: misses it
        RequestResult(2.0, error="HTTP 503"),
    ]
    s = summarize(results, SLO(ttft_ms=200, itl_ms=150))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 503"])
    assert s["duration_s"] == pytest.approx(2.0)  # first arrival 0 -> last token 2.0
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(10 / 2.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["itl_ms"]["median"] == pytest.approx(50)  # [100, 100, 50, 50, 50, 50, 800]
    assert s["goodput"] == pytest.approx(1 / 2.0)
    assert s["slo_attainment"] == pytest.approx(1 / 4)


def test_summary_of_all_failed():
    s = summarize([RequestResult(0.0, error="boom")], SLO(1, 1))
    assert s["completed"] == 0 and s["errors"] == ["boom"]


def test_table_shows_each_run_and_failed_ones():
    ok = summarize([result(0.0, [0.1, 0.2])], SLO(1000, 1000))
    failed = summarize([RequestResult(0.0, error="x")], SLO(1, 1))
    table = format_table([{"system": "moeray", "rate": 2.0, "summary": ok},
                          {"system": "vllm", "rate": math.inf, "summary": failed}])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["system", "rate"]
    assert lines[2].split()[:3] == ["moeray", "2", "1/1"]
    assert lines[3].split()[:3] == ["vllm", "inf", "0/1"]


def test_ratios_compare_moeray_with_each_peer_at_the_same_rate():
    fast = summarize([result(0.0, [0.1, 0.2, 0.3])], SLO(1, 1))
    slow = summarize([result(0.0, [0.2, 0.4, 0.6])], SLO(1, 1))
    got = ratios([{"system": "moeray", "rate": 1.0, "summary": fast},
                  {"system": "transformers", "rate": 1.0, "summary": slow}])
    assert list(got) == ["moeray/transformers@1"]
    assert got["moeray/transformers@1"]["output_throughput"] == pytest.approx(2.0)
    assert got["moeray/transformers@1"]["ttft_median"] == pytest.approx(0.5)


def test_json_safe_turns_nan_and_inf_into_null():
    assert _json_safe({"a": [math.nan, 1.0, math.inf], "b": (2, -math.inf)}) == {"a": [None, 1.0, None], "b": [2, None]}


# ---------------------------------------------------------------------------------------------------------
# Command line


def test_quick_plan_is_small_and_skips_nothing_it_was_not_asked_to():
    plan = make_plan(parse("--quick"))
    assert plan.num_prompts <= 32 and len(plan.rates) <= 3 and math.isinf(plan.rates[-1])
    assert plan.systems == ["moeray", "transformers", "vllm"]
    assert make_plan(parse("--quick", "--num-prompts", "5", "--rates", "1,inf")).rates == [1.0, math.inf]


@pytest.mark.parametrize("argv", [["--rates", "0"], ["--rates=-1,2"], ["--rates", "fast"],
                                  ["--systems", "moeray,tgi"]])
def test_bad_flags_are_refused_naming_them(argv):
    with pytest.raises(ValueError, match=argv[0].partition("=")[0]):
        make_plan(parse(*argv))


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from moeray.bench.serving import plot

    slo = SLO(1000, 100)
    runs = {name: {rate: [result(0.0, [0.05 * k, 0.05 * k + 0.01, 0.05 * k + 0.03]) for k in range(1, 4)]
                   for rate in (1.0, math.inf)} for name in ("moeray", "transformers")}
    summaries = [{"system": n, "rate": r, "summary": summarize(rs, slo)}
                 for n, by_rate in runs.items() for r, rs in by_rate.items()]
    paths = plot(runs, summaries, slo, tmp_path / "serving.json", "title")
    assert [p.name for p in paths] == ["serving_latency_cdf.png", "serving_throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
