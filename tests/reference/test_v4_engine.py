"""DeepSeek-V4 through the engine in process (paged cache, 4 expert groups, local transport): continuous
batching, chunked prefill, micro-batches, preemption and KV-store prefix reuse pass the teacher-forcing check."""

import pytest
import torch
from support.teacher import assert_teacher_forced, hf_logits, teacher_forcing_failures
from support.tiny_v4 import CONFIGS, build, load_hf

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.prefix import LocalKVClient, PrefixCache
from moeray.engine.transport import LocalTransport
from moeray.kvstore.store import ShardStore
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable

BLOCK = {"a": 16, "b": 12}  # multiples of each config's compress rates (a: 4, 8; b: 2, 6)


def engine_for(name, groups=4, prefix=None, **kw):
    ref = ReferenceModel.from_pretrained(build(name), num_expert_groups=groups)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, groups)
    return Engine(ref.dense, LocalTransport(dict(enumerate(ref.groups)), table),
                  EngineConfig(block_size=BLOCK[name], **kw), prefix=prefix)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kw", [dict(num_blocks=256, max_num_batched_tokens=64),
                                dict(num_blocks=256, max_num_batched_tokens=48, micro_batches=2),
                                dict(num_blocks=24, max_num_batched_tokens=64)], ids=["plain", "microbatch", "preempt"])
def test_batch_passes_teacher_forcing(name, kw):
    eng = engine_for(name, **kw)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
               for _ in range(8)]
    params = [greedy(int(torch.randint(1, 33, (1,), generator=g))) for _ in range(8)]
    outs = eng.generate(prompts, params)
    hf = load_hf(name)
    assert_teacher_forced(hf, prompts, params, outs)
    assert eng.num_free_blocks == kw["num_blocks"]
    if kw["num_blocks"] == 24:
        assert eng.scheduler.num_preemptions > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_prefix_from_the_kv_store_gives_the_same_tokens(name):
    store = ShardStore(64 << 20)

    def with_store():
        return engine_for(name, groups=2, num_blocks=128,
                          prefix=PrefixCache(LocalKVClient(store), BLOCK[name], f"tiny-v4{name}", "none"))

    g = torch.Generator().manual_seed(1)
    shared = torch.randint(2, 128, (48,), generator=g).tolist()
    a, b = shared + torch.randint(2, 128, (13,), generator=g).tolist(), shared + [5, 9, 77, 3, 41, 2, 8]
    with_store().generate([a], greedy(4))
    cached = with_store().generate([b], greedy(16))[0]  # a fresh engine: the 48 shared tokens come from the store
    plain = engine_for(name, groups=2, num_blocks=128).generate([b], greedy(16))[0]
    assert cached.num_cached_tokens == 48
    assert cached.token_ids == plain.token_ids
    assert teacher_forcing_failures(hf_logits(load_hf(name), b + cached.token_ids), len(b), cached.token_ids) == []
