"""DeepSeek-V4 through the distributed engine: 4 expert-group actors over Ray, 32 greedy steps pass the
teacher-forcing check."""

import pytest
import torch
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_v4 import build, load_hf

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig


@pytest.mark.parametrize("name,block", [("a", 16), ("b", 12)])
def test_v4_on_four_expert_actors(ray_session, name, block):
    dep = deploy(ServeConfig(dtype="float32",
                             model=str(build(name)), num_expert_groups=4, block_size=block, kv_cache_blocks=128,
                             max_num_batched_tokens=48, controller=False))
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (45, 20, 60, 9)]
        outs = dep.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        hf = load_hf(name)
        for p, o in zip(prompts, outs, strict=True):
            assert len(o.token_ids) == 32
            assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []
    finally:
        dep.shutdown()
