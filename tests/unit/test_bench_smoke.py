"""The benchmarks' measurement code at tiny sizes: the result has the documented keys and sane, self-consistent
numbers. No timing assertions (the machine is shared); the engine benchmark's pure helpers are checked without
starting any system."""

import json
import math

import pytest
import torch

from moeray.bench import engine as engine_bench
from moeray.bench import experts as experts_bench

TINY = experts_bench.Sizes(hidden=64, inter=32, peak_n=128, copy_mib=4)
CASES = (experts_bench.Case(8, 4), experts_bench.Case(32, 16))


@pytest.fixture(scope="module")
def result():
    return experts_bench.run(CASES, TINY, threads=1, repeats=2)


def test_experts_result_has_documented_keys(result):
    keys = {"peaks", "best_peaks", "rows", "goal_fraction", "min_fraction", "cases_meeting_goal", "machine"}
    assert keys <= set(result)
    assert set(result["peaks"]) == {"matmul_flops_per_s", "copy_bytes_per_s"}
    assert len(result["rows"]) == len(CASES)
    json.dumps(result)  # serialisable as written


def test_experts_rows_are_self_consistent(result):
    peak, bw = result["peaks"]["matmul_flops_per_s"], result["peaks"]["copy_bytes_per_s"]
    for row, case in zip(result["rows"], CASES, strict=True):
        assert row["pairs"] == case.tokens * case.top_k
        assert 1 <= row["experts_hit"] <= case.num_experts
        assert row["flops"] == 6 * row["pairs"] * TINY.hidden * TINY.inter
        assert row["weight_bytes"] == row["experts_hit"] * 3 * TINY.hidden * TINY.inter * 4
        assert math.isclose(row["roofline_flops_per_s"], min(peak, bw * row["intensity_flops_per_byte"]))
        assert row["bound"] == ("compute" if peak <= bw * row["intensity_flops_per_byte"] else "memory")
        assert math.isclose(row["fraction_of_roofline"], row["achieved_flops_per_s"] / row["roofline_flops_per_s"])
        assert row["fraction_of_roofline"] > 0 and len(row["times_s"]) == 2
    assert result["min_fraction"] == min(r["fraction_of_roofline"] for r in result["rows"])


def test_experts_routing_is_top_k_distinct_and_normalised():
    pair_rows, ids, w = experts_bench.make_routing(experts_bench.Case(10, 8), torch.Generator().manual_seed(0))
    assert pair_rows.tolist() == [t for t in range(10) for _ in range(2)]
    assert all(a != b for a, b in ids.view(10, 2).tolist())
    assert torch.allclose(w.view(10, 2).sum(-1), torch.ones(10))


def test_experts_table_formats(result):
    text = experts_bench.format_table(result)
    assert "peaks" in text and "frac" in text and len(text.splitlines()) == 4 + len(CASES)


def test_engine_ratios_divide_by_the_best_peer_at_each_batch():
    summary = {"transformers_fp32": {1: {"tok_per_s": 100.0}, 64: {"tok_per_s": 100.0}},
               "transformers_bf16": {1: {"tok_per_s": 80.0}, 64: {"tok_per_s": 150.0}},
               "vllm_bf16": {1: {"tok_per_s": 200.0}, 64: {"tok_per_s": 120.0}},
               "moeray_local": {1: {"tok_per_s": 100.0}, 64: {"tok_per_s": 300.0}}}
    r = engine_bench.ratios(summary, (1, 64))
    assert r["best_peer"] == {1: "vllm_bf16", 64: "transformers_bf16"}
    assert r["local_over_best_peer"] == pytest.approx({1: 0.5, 64: 2.0})
    assert r["local_over_best_transformers"] == pytest.approx({1: 1.0, 64: 2.0})
    assert r["local_over_best_vllm"] == pytest.approx({1: 0.5, 64: 2.5})
    assert r["headline"] == {"min_local_over_best_peer": pytest.approx(0.5), "goal_met": False}
    per_cpu = {"vllm_bf16": {1: {"tok_per_s": 1.0, "tok_per_cpu_s": 50.0}},
               "moeray_local": {1: {"tok_per_s": 1.0, "tok_per_cpu_s": 40.0}}}
    assert engine_bench.ratios(per_cpu, (1,))["local_over_best_peer_per_cpu_s"] == {1: pytest.approx(0.8)}
    assert engine_bench.ratios({"moeray_local": {1: {"tok_per_s": 1.0}}}, (1,))["local_over_best_peer"] == {1: None}
    agree = engine_bench.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert agree == {"identical": 0.5, "matching_prefix": pytest.approx((1 + 1 / 3) / 2)}


def test_engine_prompts_are_fixed_by_seed():
    a = engine_bench.make_prompts(4, 64, 4096, seed=0)
    assert a == engine_bench.make_prompts(4, 64, 4096, seed=0)
    assert len(a) == 4 and {len(p) for p in a} == {64} and all(0 <= t < 4096 for p in a for t in p)


def test_engine_step_parts_split_the_gating_step_per_step_median():
    rounds = [{"steps": 10, "step_counters": {"busy_s": 0.5, "dispatch_s": 0.05, "wait_s": 0.2, "cpu_wait_s": 0.04}},
              {"steps": 20, "step_counters": {"busy_s": 1.2, "dispatch_s": 0.1, "wait_s": 0.5, "cpu_wait_s": 0.1}}]
    p = engine_bench.step_parts_ms(rounds)
    assert p["step"] == pytest.approx(55.0)  # median of 50 and 60 ms per step
    assert p["dispatch"] == pytest.approx(5.0) and p["expert_wait"] == pytest.approx(22.5)
    assert p["gating_compute"] == pytest.approx(27.5) and p["cpu_wait"] == pytest.approx(4.5)
