"""The engine in process (local transport, no Ray) for every family: continuous batching, chunked prefill,
micro-batches and preemption all pass the teacher-forcing check."""

import pytest
import torch
from support.teacher import assert_teacher_forced
from support.tiny_models import FAMILIES, build, load_hf

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.transport import LocalTransport
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable


def engine_for(family, **kw):
    ref = ReferenceModel.from_pretrained(build(family), num_expert_groups=4)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 4)
    return Engine(ref.dense, LocalTransport(dict(enumerate(ref.groups)), table), EngineConfig(**kw))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw", [dict(num_blocks=256, max_num_batched_tokens=128),
                                dict(num_blocks=256, max_num_batched_tokens=96, micro_batches=2),
                                dict(num_blocks=30, max_num_batched_tokens=128)],
                         ids=["plain", "microbatch", "preempt"])
def test_batch_passes_teacher_forcing(family, kw):
    eng = engine_for(family, block_size=16, **kw)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (int(torch.randint(1, 201, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    params = [SamplingParams(max_tokens=int(torch.randint(1, 65, (1,), generator=g)), temperature=0.0,
                             ignore_eos=True) for _ in range(16)]
    outs = eng.generate(prompts, params)
    hf = load_hf(family)
    assert_teacher_forced(hf, prompts, params, outs)
    assert eng.num_free_blocks == kw["num_blocks"]
    if kw["num_blocks"] == 30:
        assert eng.scheduler.num_preemptions > 0


def test_eos_stops_unless_ignored():
    eng = engine_for("mixtral", num_blocks=64)
    base = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].token_ids
    eos = base[4]
    eng.cfg = eng.cfg.model_copy(update={"eos_token_ids": (eos,)})
    out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert out.finish_reason == "eos" and out.token_ids == base[:base.index(eos) + 1]
    out2 = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert out2.token_ids == base


def test_stop_strings_use_the_decoder():
    eng = engine_for("mixtral", num_blocks=64)
    base = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0].token_ids
    eng.decode = lambda ids: " ".join(f"t{i}" for i in ids)
    out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, stop=[f"t{base[3]}"],
                                                   ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == base[:base.index(base[3]) + 1]


def test_top_k_one_is_greedy_and_seed_is_reproducible():
    eng = engine_for("qwen2_moe", num_blocks=64)
    greedy = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    topk1 = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3,
                                                     ignore_eos=True))[0]
    assert topk1.token_ids == greedy.token_ids
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.8, seed=7, ignore_eos=True)
    assert eng.generate([[1, 2, 3]], sp)[0].token_ids == eng.generate([[1, 2, 3]], sp)[0].token_ids
