"""Randomized fault run: 5 rounds of ragged greedy batches while expert, gating, KV-shard and controller actors
are killed at random points (4 kills a round, one pair less than a second apart); no request is lost, every one
ends with exactly max_tokens tokens and passes the teacher-forcing check (fp32, transformers)."""

import pytest

from moeray.actors.deploy import deploy
from moeray.bench.failover import _build, chaos_config, chaos_run

pytestmark = pytest.mark.slow


def test_randomized_kills_lose_no_request(ray_session):
    path = _build("qwen3_moe")
    dep = deploy(chaos_config(path))
    try:
        res = chaos_run(dep, path, rounds=5, faults_per_round=4, requests=6, seed=1)
    finally:
        dep.shutdown()
    for kind, v in res["by_kind"].items():
        print(f"{kind}: {v['faults']} faults, worst stall {v['stall_s_max']}")
    assert res["faults"] >= 20 and res["kills_within_1s"] >= 5
    assert {k for k, v in res["by_kind"].items() if v["faults"]} == {"expert", "gating", "kv_shard", "controller"}
    assert res["lost_requests"] == 0
    assert res["wrong_length"] == 0
    assert res["teacher_forcing_failures"] == 0
