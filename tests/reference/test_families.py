"""Every family against transformers (DESIGN.md correctness protocol): prefill logits, greedy decode through
moeray's KV cache checked by teacher forcing, and the expert-group split."""

import pytest
import torch
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_models import FAMILIES, build, load_hf

from moeray.models.reference import ReferenceModel


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def models(family):
    return ReferenceModel.from_pretrained(build(family)), load_hf(family)


def test_prefill_logits_match_transformers(models):
    ours, hf = models
    ids = torch.randint(0, 128, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours.forward(ids) - ref).abs().max().item() <= 1e-4


def test_greedy_decode_passes_teacher_forcing(models):
    ours, hf = models
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    out = ours.generate(prompt, max_new_tokens=32)
    assert out.shape == (1, 12 + 32)
    seq = out[0].tolist()
    assert teacher_forcing_failures(hf_logits(hf, seq), 12, seq[12:]) == []


@pytest.mark.parametrize("groups,placement", [(2, "round_robin"), (4, "round_robin"), (2, "blocks"), (4, "blocks")])
def test_expert_groups_match_unsplit(family, models, groups, placement):
    ours, _ = models
    split = ReferenceModel.from_pretrained(build(family), num_expert_groups=groups, placement=placement)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))
    assert (split.forward(ids) - ours.forward(ids)).abs().max().item() <= 1e-5


def test_expert_group_loads_only_its_experts(family):
    split = ReferenceModel.from_pretrained(build(family), num_expert_groups=4, placement="blocks")
    for gi, g in enumerate(split.groups):
        for experts in g.loaded().values():
            assert experts == [gi * 2, gi * 2 + 1]
