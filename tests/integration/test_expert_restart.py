"""A restarted expert actor loads the slots of the controller's current table, not its constructor's: after an
EPLB rebalance moved slots, Ray's restart of a killed expert actor comes back holding what the table says (the
controller's health loop is slowed down here so that it cannot be what reloaded them)."""

import pytest
import ray
from support.tiny_models import build_skewed
from support.waiting import wait_for

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.router.table import RoutingTable

PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10, 11], list(range(20, 60))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def dep(ray_session):
    d = deploy(ServeConfig(dtype="float32", model=str(build_skewed()), num_expert_groups=4, placement="blocks",
                           kv_cache_blocks=128, health_period_s=3600.0, namespace="moeray-expert-restart"))
    yield d
    d.shutdown()


def _as_sets(slots):
    return {int(layer): set(experts) for layer, experts in slots.items() if experts}


def test_restarted_expert_loads_the_current_table(dep):
    before = RoutingTable.from_dict(ray.get(dep.controller.get_table.remote()))
    for _ in range(3):
        dep.generate(PROMPTS, GREEDY)
    assert dep.rebalance(num_redundant=8)["changed"]
    after = RoutingTable.from_dict(ray.get(dep.controller.get_table.remote()))
    moved = [a for a in after.actor_ids if _as_sets(after.actor_slots(a)) != _as_sets(before.actor_slots(a))]
    assert moved, "the rebalance moved no slot"
    a = moved[0]
    handle = dep.expert_actors[a]
    pid = ray.get(handle.stats.remote())["pid"]
    ray.kill(handle, no_restart=False)
    wait_for(lambda: _pid(handle) not in (None, pid), timeout_s=120)
    assert _as_sets(ray.get(handle.loaded.remote())) == _as_sets(after.actor_slots(a))


def _pid(handle):
    try:
        return ray.get(handle.stats.remote(), timeout=5)["pid"]
    except Exception:  # noqa: BLE001 - restarting
        return None
