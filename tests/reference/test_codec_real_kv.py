"""Each KV codec within its documented bound on real model KV: the paged cache of a tiny model after a prefill
(GQA K/V of qwen3_moe, MLA latent + rope key of deepseek_v3)."""

import pytest
import torch
from support.tiny_models import build
from unit.test_kv_codec import assert_within_bound  # the bounds the unit tests use

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.transport import LocalTransport
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable


def real_blocks(family: str):
    ref = ReferenceModel.from_pretrained(build(family))
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 1)
    eng = Engine(ref.dense, LocalTransport({0: ref.groups[0]}, table), EngineConfig(block_size=16, num_blocks=16))
    prompt = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    eng.add_request("r", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    eng.step()
    return [eng.cache.read_block(eng.seqs["r"].block_table, j) for j in range(6)]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_codec_bound_on_real_kv(family, codec):
    n = 0
    for block in real_blocks(family):
        for layer in block:
            for x in layer.values():
                assert x.abs().max() > 0
                assert_within_bound(x, codec)
                n += 1
    assert n > 0
