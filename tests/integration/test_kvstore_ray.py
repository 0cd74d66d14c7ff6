"""The KV-store service on Ray (`none` codec, exact): prefix reuse across requests, no acknowledged block lost
when a shard dies (r=2)."""

import pytest
import ray
import torch
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_models import build, load_hf

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import KVStoreConfig, ServeConfig

FAMILY = "mixtral"


@pytest.fixture(scope="module")
def dep(ray_session):
    d = deploy(ServeConfig(dtype="float32", model=str(build(FAMILY)), num_expert_groups=2, kv_cache_blocks=256,
                           kv_store=KVStoreConfig(enabled=True, num_shards=3, replication=2)))
    yield d
    d.shutdown()


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_shared_prefix_is_fetched_not_recomputed(dep):
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 128, (256,), generator=g).tolist()
    a = shared + torch.randint(0, 128, (30,), generator=g).tolist()
    b = shared + torch.randint(0, 128, (7,), generator=g).tolist()
    out_a = dep.generate([a], greedy(10))[0]
    ray.get(dep.gating[0].flush_kv.remote())
    before = ray.get(dep.gating[0].status.remote())["prefill_tokens"]
    out_b = dep.generate([b], greedy(10))[0]
    after = ray.get(dep.gating[0].status.remote())["prefill_tokens"]
    assert out_a.num_cached_tokens == 0 and out_b.num_cached_tokens == 256
    assert after - before == len(b) - 256
    hf = load_hf(FAMILY)
    for p, o in ((a, out_a), (b, out_b)):
        assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []


def test_killing_one_shard_loses_no_acknowledged_block(dep):
    dep.generate([list(range(1, 120)), list(range(3, 90))], greedy(40))
    ray.get(dep.gating[0].flush_kv.remote())
    acked = ray.get(dep.gating[0].acked_keys.remote())
    assert len(acked) > 10
    victim = "kv-1"
    ray.kill(dep.kv_shards[victim], no_restart=True)
    survivors = {s: a for s, a in dep.kv_shards.items() if s != victim}
    have = set()
    for a in survivors.values():
        have |= set(ray.get(a.keys.remote()))
    assert set(acked) <= have
