"""The controller on a running deployment: ops commands (status, scale, drain), EPLB on a skewed load with
outputs unchanged, and a controller restart that keeps the routing table and the replicas the controller
started; shutdown ends those too."""

import os

import pytest
import ray
from support.tiny_models import build_skewed
from support.waiting import wait_for

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig

PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10, 11], list(range(20, 60))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def dep(ray_session):
    d = deploy(ServeConfig(dtype="float32",
                           model=str(build_skewed()), num_expert_groups=4, placement="blocks", kv_cache_blocks=128,
                           health_period_s=0.5))
    yield d
    d.shutdown()


def test_status_lists_every_actor_with_node_and_health(dep):
    st = dep.status()
    assert [e["actor_id"] for e in st["experts"]] == [0, 1, 2, 3]
    assert all(e["healthy"] and e["routed"] for e in st["experts"])
    assert st["table_version"] >= 0 and st["gating"][0]["free_blocks"] == 128


def test_eplb_lowers_imbalance_and_keeps_outputs(dep):
    before = [o.token_ids for o in dep.generate(PROMPTS, GREEDY)]
    for _ in range(3):
        dep.generate(PROMPTS, GREEDY)
    imb = ray.get(dep.controller.imbalance.remote())
    assert imb >= 2.0  # experts 0 and 1 (actor 0) take every token
    r = dep.rebalance(num_redundant=8)
    assert r["changed"] and r["imbalance_after"] <= 1.3
    assert [o.token_ids for o in dep.generate(PROMPTS, GREEDY)] == before
    # measured again on traffic after the switch
    for _ in range(2):
        dep.generate(PROMPTS, GREEDY)
    assert ray.get(dep.controller.imbalance.remote()) <= 1.3


def test_scale_adds_and_drain_removes_a_replica(dep):
    before = [o.token_ids for o in dep.generate(PROMPTS, GREEDY)]
    r = dep.scale(0, 2)
    assert len(r["replicas"]) == 2
    new_id = r["replicas"][1]
    wait_for(lambda: any(e["actor_id"] == new_id and e["routed"] for e in dep.status()["experts"]))
    assert [o.token_ids for o in dep.generate(PROMPTS, GREEDY)] == before
    dep.drain(new_id)
    assert all(e["actor_id"] != new_id for e in dep.status()["experts"])
    assert [o.token_ids for o in dep.generate(PROMPTS, GREEDY)] == before


def test_drain_of_last_replica_is_refused(dep):
    with pytest.raises(Exception, match="cannot drain actor"):
        dep.drain(2)


def test_gating_actor_refuses_an_older_table(dep):
    current = ray.get(dep.controller.get_table.remote())
    stale = dict(current, version=current["version"] - 1)
    assert ray.get(dep.gating[0].set_table.remote(stale)) == current["version"]  # kept the newer one
    assert ray.get(dep.gating[0].status.remote())["table_version"] == current["version"]


def test_concurrent_changes_are_serialised(dep):
    # a rebalance and a scale sent at once: the writer lock runs them one after the other, so neither erases the
    # other (the scale's new replica survives the rebalance's new table, and vice versa). An async actor does not
    # keep submission order, so either may run first: the rebalance takes its default redundant slots, which fit
    # 4 actors and 5 alike (an explicit 4 fails on 5 actors: 8 + 4 slots do not split evenly)
    dep.generate(PROMPTS, GREEDY)
    rebalance = dep.controller.rebalance.remote()
    scale = dep.controller.scale.remote(1, 2)
    ray.get([rebalance, scale])
    st = dep.status()
    assert len(st["groups"]["1"]) == 2
    new_id = st["groups"]["1"][1]
    assert new_id in [e["actor_id"] for e in st["experts"]]
    wait_for(lambda: any(e["actor_id"] == new_id and e["routed"] for e in dep.status()["experts"]))
    assert [len(o.token_ids) for o in dep.generate(PROMPTS, GREEDY)] == [12, 12, 12]
    # and once more on 5 actors for certain (what `moeray rebalance` after `moeray scale 1 2` does)
    assert dep.rebalance()["changed"]
    assert [len(o.token_ids) for o in dep.generate(PROMPTS, GREEDY)] == [12, 12, 12]


def test_controller_restart_keeps_routing_table(dep):
    before = ray.get(dep.controller.get_table.remote())
    _restart_controller(dep)
    after = ray.get(dep.controller.get_table.remote(), timeout=30)
    assert after["version"] >= before["version"]
    assert after["replicas"] == before["replicas"]
    assert [len(o.token_ids) for o in dep.generate(PROMPTS, GREEDY)] == [12, 12, 12]


def test_controller_restart_keeps_its_replicas_and_replaces_what_died_meanwhile(dep):
    # Ray ends an actor when the process that created it dies: a replica the controller added must not go with a
    # controller restart, and an actor that died for good while no controller ran is replaced by the next one
    want = [o.token_ids for o in dep.generate(PROMPTS, GREEDY)]
    group = 2
    victim = dep.status()["groups"][str(group)][0]
    added = dep.scale(group, 2)["replicas"][1]
    wait_for(lambda: any(e["actor_id"] == added and e["routed"] for e in dep.status()["experts"]))
    actors = dep.expert_actors
    added_pid, victim_pid = _pid(actors[added]), _pid(actors[victim])
    _restart_controller(dep, then=lambda: ray.kill(actors[victim], no_restart=True))  # gone for good meanwhile
    assert _pid(dep.expert_actors[added]) == added_pid  # the same process: it outlived its creator
    wait_for(lambda: {e["actor_id"] for e in dep.status()["experts"] if e["routed"]} >= {victim, added}, timeout_s=60)
    assert _try(lambda: _pid(dep.expert_actors[victim])) not in (None, victim_pid)
    assert [o.token_ids for o in dep.generate(PROMPTS, GREEDY)] == want
    dep.drain(added)


def test_shutdown_kills_the_actors_the_controller_started(ray_session):
    d = deploy(ServeConfig(dtype="float32", model=str(build_skewed()), num_expert_groups=2, health_period_s=0.5))
    added = d.scale(0, 2)["replicas"][1]
    wait_for(lambda: any(e["actor_id"] == added and e["pending"] is False for e in d.status()["experts"]))
    prefix = f"{d.name}-"
    assert any(n["name"] == f"{prefix}expert-{added}" for n in ray.util.list_named_actors(all_namespaces=True))
    d.shutdown()
    wait_for(lambda: not [n for n in ray.util.list_named_actors(all_namespaces=True) if n["name"].startswith(prefix)])


def _restart_controller(dep, then=lambda: None):
    """Kill the controller so that Ray restarts it, run `then`, and return once a new process answers (a call
    sent just after the kill may still be answered by the old one)."""
    old = _pid(dep.controller)
    ray.kill(dep.controller, no_restart=False)
    then()
    wait_for(lambda: _try(lambda: _pid(dep.controller) != old), what="a new controller process")


def _pid(actor):
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - still restarting
        return None
