"""bench/experts.py --packed at tiny sizes: documented keys, self-consistent ratios and byte counts (no timing
assertions: the machine is shared)."""

import json
import math

import pytest

from moeray.bench import experts as bench

TINY = bench.Sizes(hidden=64, inter=32)


@pytest.fixture(scope="module")
def result():
    return bench.run_packed((1, 8), TINY, num_experts=4, threads=1, repeats=2)


def test_packed_result_keys_and_json(result):
    assert {"rows", "weight_bytes_per_expert", "goals", "machine", "num_experts"} <= set(result)
    assert [r["tokens"] for r in result["rows"]] == [1, 8]
    json.dumps(result)


def test_packed_bytes_per_expert(result):
    b = result["weight_bytes_per_expert"]
    weights = 3 * TINY.hidden * TINY.inter
    assert b["fp32"] == 4 * weights
    # bf16 on CPU: plus the oneDNN-packed copy of each slot the per-expert loop used (ExpertGroup.nbytes counts it)
    assert 2 * weights <= b["bf16"] <= 4 * weights
    assert b["mxfp4/fp32"] == b["mxfp4/bf16"] == weights * 4.25 / 8  # nibble + e8m0 per 32
    assert b["fp8/fp32"] == weights + 3 * 4  # one 128x128 block (float32 scale) per projection at this size


def test_packed_ratios_match_their_times(result):
    for r in result["rows"]:
        med = r["median_s"]
        assert math.isclose(r["mxfp4/fp32_vs_fp32"], med["fp32"] / med["mxfp4/fp32"])
        assert math.isclose(r["best fp8/bf16_vs_bf16"], r["best_s"]["bf16"] / r["best_s"]["fp8/bf16"])
        assert math.isclose(r["tokens_per_s"]["fp32"], r["tokens"] / med["fp32"])
        cpu = r["cpu_median_s"]
        assert math.isclose(r["cpu mxfp4/bf16_vs_bf16"], cpu["bf16"] / cpu["mxfp4/bf16"])
        assert all(s > 0 for s in cpu.values())
