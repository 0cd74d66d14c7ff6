"""The batched paged attention (models/paged_attention.py) against the per-sequence code it replaces, on a step
mixing decode tokens and prefill chunks, with and without a sliding window: same cache, same outputs."""

import pytest
import torch
from support.tiny_models import build

from moeray.common import SamplingParams
from moeray.engine.block_manager import build_kv_cache
from moeray.engine.engine import EngineConfig
from moeray.engine.sequence import Sequence
from moeray.kvstore.spec import ModelCacheSpec
from moeray.models.attention import GQAttention
from moeray.models.config import ModelConfig
from moeray.models.dense import SeqBatch, SeqChunk


def _cache_and_seqs(attn, history, new):
    """A paged cache holding `history[i]` tokens of sequence i, with room for `new[i]` more."""
    spec = ModelCacheSpec((attn.cache_spec(),))
    cache, blocks = build_kv_cache(spec, EngineConfig(block_size=4, num_blocks=64), None, torch.float32)
    seqs = []
    for i, (h, n) in enumerate(zip(history, new, strict=True)):
        s = Sequence(f"s{i}", list(range(h + n)), SamplingParams(max_tokens=1))
        blocks.allocate(s, h + n)
        seqs.append(s)
    return cache, seqs


@pytest.mark.parametrize("window", [0, 5])
def test_batched_step_matches_per_sequence_attention(window):
    cfg = ModelConfig.from_pretrained(build("qwen3_moe"))
    attn = GQAttention(cfg, 0).eval()
    attn.window = window
    history, new = [7, 0, 12, 3], [1, 6, 1, 9]  # decode, a first chunk, decode, a later chunk
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(h, cfg.hidden_size, generator=g) for h in history]
    x = torch.randn(sum(new), cfg.hidden_size, generator=g)
    outs = []
    for batched in (False, True):
        cache, seqs = _cache_and_seqs(attn, history, new)
        views = [cache.view(s.block_table) for s in seqs]
        with torch.inference_mode():
            for v, p in zip(views, past, strict=True):  # the history, written the per-sequence way in both runs
                if p.shape[0]:
                    attn._forward_per_seq(p, [SeqChunk(p.shape[0], 0, v)], 0)
            chunks = [SeqChunk(n, h, v) for h, n, v in zip(history, new, views, strict=True)]
            if batched:
                outs.append(attn.forward_batch(x, SeqBatch(chunks), 0))
                assert chunks and cache.batched_decode_calls == 1  # the decode group ran batched
            else:
                outs.append(attn._forward_per_seq(x, chunks, 0))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
