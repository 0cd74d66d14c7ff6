"""DeepSeek-V4 against transformers 5.24 (DESIGN.md correctness protocol) and against itself under any chunking.

Two tiny configs (tests/support/tiny_v4.py) hold every layer kind; prompts are longer than the sliding window
and than several compression windows, with more compressed rows than index_topk.
"""

import pytest
import torch
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_v4 import CONFIGS, build, load_hf

from moeray.models.dense import ContiguousCache, SeqChunk
from moeray.models.reference import ReferenceModel


@pytest.fixture(scope="module", params=CONFIGS)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def ours(name):
    return ReferenceModel.from_pretrained(build(name))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run_chunked(model: ReferenceModel, ids: list[int], sizes: list[int]) -> torch.Tensor:
    """Logits [T, V] of one sequence fed in chunks of `sizes` (cycled) through one cache."""
    cache = ContiguousCache(model.dense.cache_spec())
    out, pos, i = [], 0, 0
    with torch.inference_mode():
        while pos < len(ids):
            n = min(sizes[i % len(sizes)], len(ids) - pos)
            out.append(model.dense.forward_tokens(torch.tensor(ids[pos:pos + n]), [SeqChunk(n, pos, cache)],
                                                  model.routed))
            pos, i = pos + n, i + 1
    return torch.cat(out)


def test_prefill_logits_match_transformers(name, ours):
    ids = torch.tensor([_ids(45, 1), _ids(45, 2)])
    with torch.no_grad():
        ref = load_hf(name)(ids).logits
    diff = (ours.forward(ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3g} vs transformers"


@pytest.mark.parametrize("groups", [1, 4])
def test_greedy_decode_passes_teacher_forcing(name, ours, groups):
    model = ours if groups == 1 else ReferenceModel.from_pretrained(build(name), num_expert_groups=groups)
    prompt = _ids(40, 3)
    seq = model.generate(torch.tensor([prompt]), max_new_tokens=32)[0].tolist()
    assert len(seq) == 40 + 32
    assert teacher_forcing_failures(hf_logits(load_hf(name), seq), 40, seq[40:]) == []


@pytest.mark.parametrize("sizes", [[20, 1], [1], [7], [3, 5, 11], [16, 1]],
                         ids=["prefill+decode", "token-by-token", "chunks7", "chunks3-5-11", "chunks16-1"])
def test_chunking_does_not_change_logits(ours, sizes):
    ids = _ids(52, 4)
    one_shot = _run_chunked(ours, ids, [len(ids)])
    diff = (_run_chunked(ours, ids, sizes) - one_shot).abs().max().item()
    assert diff <= 1e-5, f"chunks {sizes}: max |logit diff| {diff:.3g} vs one-shot prefill"


def test_ragged_batch_matches_separate_sequences(ours):
    a, b = _ids(30, 5), _ids(23, 6)
    caches = [ContiguousCache(ours.dense.cache_spec()) for _ in range(2)]
    with torch.inference_mode():
        # both sequences prefilled in one flattened batch, then both continued in another
        first = ours.dense.forward_tokens(torch.tensor(a[:17] + b[:9]),
                                          [SeqChunk(17, 0, caches[0]), SeqChunk(9, 0, caches[1])], ours.routed)
        second = ours.dense.forward_tokens(torch.tensor(a[17:] + b[9:]),
                                           [SeqChunk(13, 17, caches[0]), SeqChunk(14, 9, caches[1])], ours.routed)
    together = torch.cat([first[:17], second[:13], first[17:], second[13:]])
    alone = torch.cat([_run_chunked(ours, a, [len(a)]), _run_chunked(ours, b, [len(b)])])
    assert (together - alone).abs().max().item() <= 1e-5


def test_expert_groups_match_unsplit(name, ours):
    split = ReferenceModel.from_pretrained(build(name), num_expert_groups=4, placement="blocks")
    ids = torch.tensor([_ids(33, 7)])
    assert (split.forward(ids) - ours.forward(ids)).abs().max().item() <= 1e-5


class _RecordingCache(ContiguousCache):
    """A contiguous cache that records every (layer, tensor, start_row, end_row) read and each chunk's start."""

    def __init__(self, spec):
        super().__init__(spec)
        self.reads, self.chunk_start = [], 0
        for i, inner in enumerate(self._layers):
            self._layers[i] = _RecordingLayer(inner, i, self)


class _RecordingLayer:
    def __init__(self, inner, layer_id, owner):
        self.inner, self.layer_id, self.owner = inner, layer_id, owner

    def write(self, name, start_row, rows):
        self.inner.write(name, start_row, rows)

    def read(self, name, start_row, end_row):
        self.owner.reads.append((self.layer_id, name, start_row, end_row, self.owner.chunk_start))
        return self.inner.read(name, start_row, end_row)


def test_cache_holds_what_the_spec_says(ours):
    spec = ours.dense.cache_spec()
    cache = _RecordingCache(spec)
    ids = _ids(50, 8)
    with torch.inference_mode():
        for start, n in ((0, 13), (13, 1), (14, 9), (23, 27)):
            cache.chunk_start = start
            ours.dense.forward_tokens(torch.tensor(ids[start:start + n]), [SeqChunk(n, start, cache)], ours.routed)
    for layer_id, layer_spec in enumerate(spec.layers):
        held = cache._layers[layer_id].inner.t
        assert set(held) == {t.name for t in layer_spec.tensors}
        for t in layer_spec.tensors:
            assert tuple(held[t.name].shape) == (50 // t.tokens_per_row, *t.row_shape), (layer_id, t.name)
    by_name = {(i, t.name): t for i, ls in enumerate(spec.layers) for t in ls.tensors}
    for layer_id, tname, start_row, _, chunk_start in cache.reads:
        t = by_name[(layer_id, tname)]
        if t.window:  # windowed tensors are only read within their window of the chunk's first token
            assert start_row * t.tokens_per_row > chunk_start - t.window, (layer_id, tname, start_row, chunk_start)
