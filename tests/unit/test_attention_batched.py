"""Batched GQA and MLA (absorbed) attention over the paged cache (one SDPA for a batch of decode tokens) against
the per-sequence path of the reference's contiguous cache: every step's logits agree and the fast path actually
runs."""

import pytest
import torch
from support.tiny_models import build

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.transport import LocalTransport
from moeray.models.dense import ContiguousCache, SeqChunk
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_batched_decode_matches_per_sequence_reference(family):
    ref = ReferenceModel.from_pretrained(build(family))
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 1)
    eng = Engine(ref.dense, LocalTransport({0: ref.groups[0]}, table),
                 EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=128))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 5, 23, 40)]
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    got = {f"r{i}": [] for i in range(len(prompts))}
    logits_seen = []
    run = eng.runner.run
    eng.runner.run = lambda chunks: logits_seen.append(([c.seq.request_id for c in chunks if c.samples],
                                                        run(chunks))) or logits_seen[-1][1]
    while eng.has_unfinished():
        for d in eng.step():
            got[d.request_id] += d.token_ids
    assert eng.cache.batched_decode_calls > 0
    # the reference: each sequence alone, per-sequence attention over a contiguous cache
    for i, p in enumerate(prompts):
        seq = p + got[f"r{i}"]
        cache = ContiguousCache(ref.dense.cache_spec())
        full = ref.dense.forward_tokens(torch.tensor(seq), [SeqChunk(len(seq), 0, cache)], ref.routed)
        step_logits = [lg[ids.index(f"r{i}")] for ids, lg in logits_seen if f"r{i}" in ids]
        for j, row in enumerate(step_logits):
            assert (row - full[len(p) - 1 + j]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fused_projections_match_the_checkpoint_modules(family):
    """fuse_projections (what the engine serves with: GQA q/k/v, MLA q_a/kv_a in one GEMM) against the
    checkpoint's separate projections, on the same weights: fp32 logits within 1e-5."""
    import copy

    from moeray.models.dense import fuse_projections

    ref = ReferenceModel.from_pretrained(build(family))
    fused = copy.deepcopy(ref.dense)
    assert fuse_projections(fused) == ref.cfg.num_hidden_layers
    ids = torch.randint(0, 128, (17,), generator=torch.Generator().manual_seed(2))
    want = ref.dense.forward_tokens(ids, [SeqChunk(17, 0, ContiguousCache(ref.dense.cache_spec()))], ref.routed)
    got = fused.forward_tokens(ids, [SeqChunk(17, 0, ContiguousCache(fused.cache_spec()))], ref.routed)
    assert (got - want).abs().max().item() <= 1e-5
    assert not any(n.endswith(("q_proj.weight", "kv_a_proj_with_mqa.weight")) for n, _ in fused.named_parameters())
