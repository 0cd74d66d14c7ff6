"""cache_salt end to end in one process (no Ray): a salted request reuses only prefixes cached or stored by
requests with the same salt, in the engine's own prefix cache and in the KV store; outputs stay exact."""

import pytest
import torch
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_models import build, load_hf

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.prefix import LocalKVClient, PrefixCache
from moeray.engine.transport import LocalTransport
from moeray.kvstore.store import ShardStore
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable

FAMILY = "qwen3_moe"
B = 16


@pytest.fixture(scope="module")
def ref():
    return ReferenceModel.from_pretrained(build(FAMILY), num_expert_groups=2)


@pytest.fixture(scope="module")
def hf():
    return load_hf(FAMILY)


def make_engine(ref, store=None):
    cfg = ref.cfg
    table = RoutingTable.round_robin(list(cfg.moe_layers), cfg.num_experts, 2)
    transport = LocalTransport({0: ref.groups[0], 1: ref.groups[1]}, table)
    prefix = PrefixCache(LocalKVClient(store), B, "tiny-qwen3", "none") if store is not None else None
    return Engine(ref.dense, transport, EngineConfig(block_size=B, num_blocks=128), prefix=prefix)


def greedy(salt=None):
    return SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, cache_salt=salt)


def prompts():
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 128, (64,), generator=g).tolist()
    return [shared + torch.randint(0, 128, (5 + i,), generator=g).tolist() for i in range(5)]


def check_exact(hf, runs):
    for p, o in runs:
        assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []


def test_local_prefix_cache_is_per_salt(ref, hf):
    eng = make_engine(ref)  # no KV store: only the engine's own prefix cache
    p = prompts()
    runs = []
    for prompt, salt, cached in ((p[0], "tenant-a", 0), (p[1], "tenant-b", 0), (p[2], None, 0),
                                 (p[3], "tenant-a", 64), (p[4], None, 64)):
        out = eng.generate([prompt], greedy(salt))[0]
        assert out.num_cached_tokens == cached, (salt, out.num_cached_tokens)
        runs.append((prompt, out))
    check_exact(hf, runs)
    # a salted request computes exactly what an unsalted one does
    assert runs[1][1].token_ids == make_engine(ref).generate([p[1]], greedy())[0].token_ids


def test_kv_store_is_per_salt(ref, hf):
    store = ShardStore(64 << 20)
    p = prompts()
    first = make_engine(ref, store).generate([p[0]], greedy("tenant-a"))[0]  # writes tenant-a's blocks
    assert first.num_cached_tokens == 0
    runs = [(p[0], first)]
    # fresh engines (empty local caches): only the store can answer
    for prompt, salt, cached in ((p[1], "tenant-b", 0), (p[2], None, 0), (p[3], "tenant-a", 64)):
        eng = make_engine(ref, store)
        out = eng.generate([prompt], greedy(salt))[0]
        assert out.num_cached_tokens == cached, (salt, out.num_cached_tokens)
        assert eng.prefix.stats.hit_blocks == cached // B
        runs.append((prompt, out))
    check_exact(hf, runs)
