"""Block keys: the hash-chain properties the KV store relies on for prefix reuse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.kvstore.keys import KEY_BYTES, ROOT_KEY, block_key, block_keys

B = 4


def keys(tokens, model_id="m", codec="none"):
    return block_keys(tokens, B, model_id, codec)


def test_one_key_per_full_block_only():
    assert len(keys(list(range(4 * B + 3)))) == 4
    assert keys(list(range(B - 1))) == []


def test_keys_are_16_bytes_and_distinct_per_block():
    ks = keys([7] * (5 * B))  # identical block contents: the chain still separates positions
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in ks)
    assert len(set(ks)) == len(ks)


def test_equal_prefixes_give_equal_keys():
    shared = list(range(3 * B))
    a, b = keys(shared + [1] * B), keys(shared + [2] * B)
    assert a[:3] == b[:3]
    assert a[3] != b[3]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    tokens=st.lists(st.integers(0, 200_000), min_size=6 * B, max_size=6 * B),
    pos=st.integers(0, 6 * B - 1),
    delta=st.integers(1, 1000),
)
def test_a_differing_token_changes_its_block_key_and_every_later_key(tokens, pos, delta):
    changed = list(tokens)
    changed[pos] += delta
    a, b = keys(tokens), keys(changed)
    block = pos // B
    assert a[:block] == b[:block]
    assert all(x != y for x, y in zip(a[block:], b[block:], strict=True))


def test_model_id_and_codec_change_every_key():
    tokens = list(range(3 * B))
    base = keys(tokens)
    for other in (keys(tokens, model_id="m2"), keys(tokens, codec="int8")):
        assert all(x != y for x, y in zip(base, other, strict=True))


def test_fields_are_length_prefixed():
    tokens = list(range(B))
    assert keys(tokens, model_id="ab", codec="c") != keys(tokens, model_id="a", codec="bc")


def test_chain_continues_from_a_parent_key():
    tokens = list(range(4 * B))
    full = keys(tokens)
    assert block_keys(tokens[B:], B, "m", "none", parent_key=full[0]) == full[1:]
    assert block_key(ROOT_KEY, tokens[:B], "m", "none") == full[0]
    assert block_key(full[2], tokens[3 * B :], "m", "none") == full[3]


def test_tensor_and_list_token_ids_agree():
    tokens = list(range(100, 100 + 3 * B))
    assert keys(torch.tensor(tokens)) == keys(tokens)


def test_keys_are_stable_across_versions():
    # Keys name blocks on disk and on other shards; a silent format change would orphan every stored block.
    assert keys([1, 2, 3, 4, 5, 6, 7, 8], model_id="demo", codec="none")[1].hex() == GOLDEN_SECOND_KEY


@pytest.mark.parametrize("bad", [[-1, 2, 3, 4], [[1, 2], [3, 4]], [0.5, 1.0, 2.0, 3.0]])
def test_invalid_token_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="token_ids"):
        keys(bad)


def test_invalid_block_size_and_parent_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        block_keys([1, 2], 0, "m", "none")
    with pytest.raises(ValueError, match="parent_key"):
        block_key(b"short", [1, 2], "m", "none")


GOLDEN_SECOND_KEY = "5bff9a7b76ec3167661b5d45b13b45ae"
