"""Engine + KV store in process (no Ray): prefix reuse prefills only the new tokens, resume from the store,
exactness with the `none` codec, lossy codecs reported not asserted."""

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


@pytest.fixture(scope="module")
def ref():
    return ReferenceModel.from_pretrained(build(FAMILY), num_expert_groups=2)


def make_engine(ref, store, codec="none", block_size=16):
    cfg = ref.cfg
    table = RoutingTable.round_robin(list(cfg.moe_layers), cfg.num_experts, 2)
    transport = LocalTransport({0: ref.groups[0], 1: ref.groups[1]}, table)
    prefix = PrefixCache(LocalKVClient(store), block_size, "tiny-qwen3", codec)
    return Engine(ref.dense, transport, EngineConfig(block_size=block_size, num_blocks=128), prefix=prefix)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_shared_prefix_prefills_only_new_tokens(ref):
    store = ShardStore(64 << 20)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 128, (256,), generator=g).tolist()
    a = shared + torch.randint(0, 128, (20,), generator=g).tolist()
    b = shared + torch.randint(0, 128, (9,), generator=g).tolist()
    eng = make_engine(ref, store)
    out_a = eng.generate([a], greedy(8))[0]
    assert out_a.num_cached_tokens == 0
    before = eng.stats["prefill_tokens"]
    out_b = eng.generate([b], greedy(8))[0]
    assert out_b.num_cached_tokens == 256
    assert eng.stats["prefill_tokens"] - before == len(b) - 256  # only the new tokens were computed
    hf = load_hf(FAMILY)
    for p, o in ((a, out_a), (b, out_b)):
        assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []


def test_second_engine_resumes_sequence_from_store(ref):
    """A 'restarted gating actor': a fresh engine resumes from token ids + stored blocks, recomputing the rest."""
    store = ShardStore(64 << 20)
    prompt = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    first = make_engine(ref, store)
    full = first.generate([prompt], greedy(30))[0].token_ids
    # a new engine that only knows the prompt and the first 12 generated tokens
    second = make_engine(ref, store)
    second.add_request("resumed", prompt, greedy(30), output_ids=full[:12])
    toks = []
    while second.has_unfinished():
        for d in second.step():
            toks += d.token_ids
            cached = d.num_cached_tokens
    assert full[:12] + toks == full
    assert cached == (70 + 12 - 1) // 16 * 16
    hf = load_hf(FAMILY)
    assert teacher_forcing_failures(hf_logits(hf, prompt + full), 70, full) == []


def test_corrupt_block_is_a_miss_not_a_crash(ref):
    store = ShardStore(64 << 20)
    prompt = list(range(1, 60))
    eng = make_engine(ref, store)
    base = eng.generate([prompt], greedy(4))[0].token_ids
    for k in store.keys():
        v = bytearray(store.get(k))
        v[-1] ^= 0xFF
        store.put(k, bytes(v))
    eng2 = make_engine(ref, store)
    out = eng2.generate([prompt], greedy(4))[0]
    assert out.token_ids == base and out.num_cached_tokens == 0
    assert eng2.prefix.stats.corrupt_blocks == 1


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_lossy_codecs_report_agreement(ref, codec, capsys):
    store = ShardStore(64 << 20)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (100,), generator=g).tolist() for _ in range(4)]
    exact = make_engine(ref, ShardStore(64 << 20)).generate(prompts, greedy(16))
    warm = make_engine(ref, store, codec)
    warm.generate(prompts, greedy(1))
    lossy = make_engine(ref, store, codec).generate(prompts, greedy(16))
    assert all(o.num_cached_tokens == 96 for o in lossy)
    agree = sum(a == b for e, lo in zip(exact, lossy) for a, b in zip(e.token_ids, lo.token_ids))
    with capsys.disabled():
        print(f"\n[{codec}] greedy agreement with exact KV: {agree}/{16 * len(prompts)}")
