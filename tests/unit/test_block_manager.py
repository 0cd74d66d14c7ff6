"""Cache pools and the block manager, pure: pool planning, window pages released as the window passes, byte
budgets, the local prefix cache (sharing, LRU eviction never handing out a page still in use)."""

import pytest
import torch

from moeray.common import SamplingParams
from moeray.engine.block_manager import BlockManager, KVBudgetError, size_pools
from moeray.engine.paged_cache import PagedKVCache, plan_pools
from moeray.engine.sequence import Sequence
from moeray.kvstore.codec import decode_block, encode_block
from moeray.kvstore.spec import CacheTensorSpec, LayerCacheSpec, ModelCacheSpec, gqa_spec

B = 16
# a V4-like layer: window 8 raw rows, compressed rows at 1/4, compressor inputs over the last 8 tokens
V4ISH = ModelCacheSpec((
    LayerCacheSpec("v4_window", (CacheTensorSpec("kv", (4,), window=8),)),
    LayerCacheSpec("v4_csa", (CacheTensorSpec("kv", (4,), window=8), CacheTensorSpec("comp", (4,), tokens_per_row=4),
                              CacheTensorSpec("comp_raw", (2, 8), window=8))),
))


def seq(ids, rid="r"):
    return Sequence(rid, list(ids), SamplingParams(max_tokens=4, temperature=0.0))


def manager(spec=V4ISH, pages=None, **kw):
    pools = plan_pools(spec, B)
    return BlockManager(pools, pages or [64] * len(pools), B, **kw), pools


def test_pools_group_tensors_by_row_rate_and_window():
    pools = plan_pools(V4ISH, B)
    assert [p.name for p in pools] == ["full/4", "window/8"]
    assert [len(p.tensors) for p in pools] == [1, 3]
    assert pools[0].page_tokens == B and pools[0].rows_per_page == 4
    assert pools[1].page_tokens == 1  # a window of 8 pages by the token
    assert plan_pools(ModelCacheSpec((gqa_spec(2, 8),)), B)[0].name == "full/1"


def test_window_pages_are_released_as_the_window_passes():
    bm, pools = manager()
    s = seq(range(100))
    bm.allocate(s, 64)  # a 64-token chunk: window rows 0..63 are all needed while it runs
    assert s.block_table.num_held(1) == 64
    s.num_computed = 64
    bm.trim(s)
    assert s.block_table.num_held(1) == 7  # a query at 64 reads rows 57..63
    assert s.block_table.num_held(0) == 4  # compressed rows are never dropped
    bm.allocate(s, 65)
    assert s.block_table.num_held(1) == 8
    bm.free(s)
    assert all(u["used_bytes"] == 0 for u in bm.usage().values())


def test_byte_budget_splits_pools_and_refuses_what_never_fits():
    pools = plan_pools(V4ISH, B)
    pages = size_pools(pools, B, 4, num_blocks=0, kv_cache_bytes=200_000, max_num_seqs=8, max_num_batched_tokens=32)
    total = sum(n * p.page_bytes(4) for n, p in zip(pages, pools))
    assert total <= 200_000
    bm = BlockManager(pools, pages, B, budget_field="kv_cache_bytes")
    bm.check_fits(pages[0] * B, "fits")
    with pytest.raises(KVBudgetError, match="kv_cache_bytes") as e:
        bm.check_fits(pages[0] * B + 1, "prompt (x tokens) + max_tokens (y)")
    assert "bytes of KV cache" in str(e.value) and "full/4" in str(e.value)
    with pytest.raises(ValueError, match="kv_cache_bytes=100 cannot hold"):
        size_pools(pools, B, 4, num_blocks=0, kv_cache_bytes=100, max_num_seqs=8, max_num_batched_tokens=32)


def test_finished_blocks_are_reused_by_a_later_sequence():
    bm, _ = manager()
    a = seq(list(range(40)), "a")
    bm.allocate(a, 40)
    a.num_computed = 40
    bm.free(a)  # blocks 0 and 1 complete: cached
    b = seq(list(range(32)) + [99] * 10, "b")
    assert bm.match_prefix(b) == 2
    bm.acquire_prefix(b, 2)
    assert b.block_table.num_held(0) == 2 and bm.stats.hit_tokens == 32
    c = seq(list(range(20)) + [7] * 30, "c")  # shares only block 0's first 16 tokens
    assert bm.match_prefix(c) == 1
    d = seq([5] + list(range(1, 40)), "d")  # differs in the first token: no hit
    assert bm.match_prefix(d) == 0


def test_a_hit_needs_the_window_rows_at_the_boundary():
    bm, pools = manager()
    a = seq(list(range(40)), "a")
    for t in range(40):  # decode-like: one token per step, window trimmed after each
        bm.allocate(a, t + 1)
        a.num_computed = t + 1
        bm.trim(a)
    bm.free(a)
    b = seq(list(range(40)) + [1], "b")
    assert bm.match_prefix(b) == 2  # the last 7 window rows of blocks 0 and 1 were kept when each completed


def test_eviction_under_pressure_never_takes_a_page_in_use():
    pools = plan_pools(V4ISH, B)
    bm = BlockManager(pools, [4, 80], B)  # 4 blocks of compressed rows
    a = seq(list(range(48)), "a")
    bm.allocate(a, 48)
    a.num_computed = 48
    bm.free(a)  # 3 cached blocks
    b = seq(list(range(32)) + [9] * 20, "b")
    k = bm.match_prefix(b)
    bm.acquire_prefix(b, k)
    shared = set(b.block_table.tables[0])
    assert k == 2
    c = seq([3] * 30, "c")
    assert bm.can_allocate(c, 30)
    bm.allocate(c, 30)  # needs 2 pages: 1 free + evicts a's cached block 2, never b's shared pages
    assert not shared & set(c.block_table.tables[0])
    assert bm.stats.evicted_pages == 1
    assert not bm.can_allocate(seq([4] * 20, "d"), 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_stored_block_round_trips_bit_exactly_in_the_cache_dtype(dtype):
    """read_block -> `none` codec -> write_block into another sequence's pages gives back the stored bytes."""
    pools = plan_pools(V4ISH, B)
    cache = PagedKVCache(V4ISH, pools, [8, 64], B, dtype=dtype)
    bm = BlockManager(pools, [8, 64], B, dtype.itemsize, prefix_caching=False)
    a, b = seq(range(40), "a"), seq(range(40), "b")
    bm.allocate(a, 32)
    g = torch.Generator().manual_seed(0)
    view = cache.view(a.block_table)
    for layer_id, layer in enumerate(V4ISH.layers):
        for t in layer.tensors:
            rows = 32 // t.tokens_per_row
            view.layer(layer_id).write(t.name, 0, torch.randn((rows, *t.row_shape), generator=g))
    stored = decode_block(encode_block(cache.read_block(a.block_table, 1), "none"))
    bm.allocate(b, 33, start=32)  # b resumes at the boundary: window rows 25..31 and every compressed row
    cache.write_block(b.block_table, 1, stored)
    again = cache.read_block(b.block_table, 1)
    for x, y in zip(stored, again):
        for name in x:
            assert x[name].dtype == dtype and torch.equal(x[name].view(torch.uint8), y[name].view(torch.uint8))
    assert {n: x.shape[0] for n, x in again[1].items()} == {"kv": 7, "comp": 4, "comp_raw": 7}
