"""deploy() never hangs on resources: on a 2-CPU Ray, a 4 groups x 2 replicas + 2 gating + 2 KV-shard deployment
comes up with its CPU shares divided automatically, and an explicit request that cannot fit is refused fast."""

from __future__ import annotations

import time

import pytest
import ray
from support.tiny_models import build

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import KVStoreConfig, ServeConfig
from moeray.common.errors import ConfigError


@pytest.fixture(scope="module")
def two_cpus():
    if ray.is_initialized():
        ray.shutdown()  # this module needs a cluster of exactly 2 CPUs; the next module restarts the shared one
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="moeray-tests", log_to_driver=False)
    yield
    ray.shutdown()


def big(**fields) -> ServeConfig:
    return ServeConfig(model=str(build("qwen3_moe")), num_expert_groups=4, expert_replicas=2, num_gating_actors=2,
                       kv_store=KVStoreConfig(enabled=True, num_shards=2), kv_cache_blocks=64, controller=False,
                       **fields)


def test_default_shares_are_divided_and_the_deployment_comes_up(two_cpus):
    dep = deploy(big())
    try:
        cfg, n = dep.config, len(dep.expert_actors)  # 4 actors, every slot held by 2 of them
        total = n * cfg.expert_num_cpus + 2 * cfg.gating_num_cpus + 2 * cfg.kv_store.shard_num_cpus
        assert total <= 2.0 and n == 4 and len(dep.gating) == 2 and len(dep.kv_shards) == 2
        assert cfg.expert_num_cpus < 0.25  # the default share did not fit: it was divided
        out = dep.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert [len(o.token_ids) for o in out] == [4, 4]
    finally:
        dep.shutdown()


def test_an_explicit_request_that_cannot_fit_is_refused_within_30s(two_cpus):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"CPUs needed .* expert_num_cpus 0\.5"):
        deploy(big(expert_num_cpus=0.5))
    assert time.monotonic() - t0 < 30.0
