"""actors/resources.py: unset CPU shares are divided to fit the cluster; an explicit misfit is named."""

from __future__ import annotations

import pytest

from moeray.actors.resources import ActorCounts, cpu_demand, fit_cpu_shares, shortfall
from moeray.common.config import KVStoreConfig, ServeConfig

# 8 expert actors + 2 gating actors + 2 KV shards: 3.2 CPUs at the default shares
BIG = ActorCounts(experts=8, gating=2, kv_shards=2)


def big_config(**fields) -> ServeConfig:
    return ServeConfig(num_expert_groups=4, expert_replicas=2, num_gating_actors=2,
                       kv_store=fields.pop("kv_store", KVStoreConfig(enabled=True, num_shards=2)), **fields)


def test_default_shares_do_not_fit_two_cpus():
    cfg = big_config()
    assert cpu_demand(cfg, BIG) == pytest.approx(3.2)
    assert "expert_num_cpus" in shortfall(cfg, BIG, {"CPU": 2.0}, [{"CPU": 2.0}])


def test_unset_shares_are_divided_to_fit():
    cfg = fit_cpu_shares(big_config(), BIG, free_cpus=2.0)
    assert cpu_demand(cfg, BIG) <= 2.0
    assert shortfall(cfg, BIG, {"CPU": 2.0}, [{"CPU": 2.0}]) is None
    # the proportions of the defaults are kept
    assert cfg.gating_num_cpus / cfg.expert_num_cpus == pytest.approx(2.0, rel=0.01)
    assert cfg.kv_store.shard_num_cpus > 0


def test_a_deployment_that_fits_is_unchanged():
    cfg = big_config()
    assert fit_cpu_shares(cfg, BIG, free_cpus=8.0) is cfg


def test_explicit_shares_are_kept_and_the_shortfall_names_them():
    cfg = big_config(expert_num_cpus=0.5, gating_num_cpus=0.5,
                     kv_store=KVStoreConfig(enabled=True, num_shards=2, shard_num_cpus=0.1))
    assert fit_cpu_shares(cfg, BIG, free_cpus=2.0) is cfg
    why = shortfall(cfg, BIG, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert "5.2 CPUs needed" in why and "expert_num_cpus 0.5" in why and "2 free" in why


def test_only_unset_shares_are_scaled():
    cfg = fit_cpu_shares(big_config(gating_num_cpus=0.5), BIG, free_cpus=2.0)
    assert cfg.gating_num_cpus == 0.5 and cfg.expert_num_cpus < 0.25
    assert cpu_demand(cfg, BIG) <= 2.0


def test_missing_accelerators_are_named():
    cfg = ServeConfig(num_expert_groups=2, device="gpu", allow_cpu_fallback=True)
    why = shortfall(cfg, ActorCounts(2, 1, 0), {"CPU": 8.0, "GPU": 1.0}, [])
    assert "2 GPUs" in why and "1 free" in why


def test_an_actor_bigger_than_any_node_is_named():
    cfg = ServeConfig(gating_num_cpus=4.0)
    why = shortfall(cfg, ActorCounts(2, 1, 0), {"CPU": 6.0}, [{"CPU": 3.0}])
    assert "4 CPUs" in why and "no node" in why


def test_gating_accelerators_count_with_the_experts_and_are_named():
    cfg = ServeConfig(num_expert_groups=2, device="gpu", gating_device="gpu", num_gating_actors=2)
    why = shortfall(cfg, ActorCounts(2, 2, 0), {"CPU": 8.0, "GPU": 3.0}, [])
    assert "2 expert actors" in why and "2 gating actors" in why and "4 GPUs" in why
    assert "num_gating_actors" in why and "gating_device: cpu" in why
    assert shortfall(cfg, ActorCounts(2, 2, 0), {"CPU": 8.0, "GPU": 4.0}, []) is None
    npu = ServeConfig(gating_device="npu")  # experts on the CPU, the gating actor on an NPU
    assert "1 NPUs" in shortfall(npu, ActorCounts(2, 1, 0), {"CPU": 8.0}, [])
    assert shortfall(npu, ActorCounts(2, 1, 0), {"CPU": 8.0, "NPU": 1.0}, []) is None
