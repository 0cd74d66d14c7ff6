"""cache_salt (vLLM's): salted requests get their own hash chains in the prefix cache, the KV store and the
affinity router; unsalted keys are bit-identical to the keys before the salt existed."""

import pytest

from moeray.common import SamplingParams
from moeray.common.api import GenerateRequest
from moeray.common.errors import RequestError
from moeray.common.sampling import MAX_CACHE_SALT_CHARS as SAMPLING_MAX
from moeray.engine.block_manager import BlockManager
from moeray.engine.paged_cache import plan_pools
from moeray.engine.sequence import Sequence
from moeray.kvstore.keys import MAX_CACHE_SALT_CHARS, ROOT_KEY, block_key, block_keys, root_key
from moeray.kvstore.spec import ModelCacheSpec, gqa_spec
from moeray.router.affinity import prefix_key

B = 16
TOKENS = list(range(40))


def test_no_salt_keys_are_the_unsalted_keys_of_before():
    # pinned from the key scheme before cache_salt existed (git show 22feb39:kvstore/keys.py): stored blocks and
    # cached prefixes of unsalted requests stay valid
    before = ["dfd7730742d941fb72268fc6dbff1875", "b39a22f10d0f7cb955fceb6495c95419"]
    assert [k.hex() for k in block_keys(TOKENS, B, "tiny-qwen3", "none")] == before
    assert [k.hex() for k in block_keys(TOKENS, B, "tiny-qwen3", "none", cache_salt=None)] == before
    assert root_key(None) == ROOT_KEY == root_key()
    assert prefix_key(list(range(20))) == 13678627390251985485  # the router's key of before, likewise pinned
    assert prefix_key(list(range(20)), cache_salt=None) == prefix_key(list(range(20)))


def test_salt_changes_every_key_and_same_salt_gives_same_keys():
    plain = block_keys(TOKENS, B, "m", "none")
    a = block_keys(TOKENS, B, "m", "none", cache_salt="tenant-a")
    b = block_keys(TOKENS, B, "m", "none", cache_salt="tenant-b")
    assert len(a) == len(b) == len(plain) == 2
    assert not set(a) & set(plain) and not set(b) & set(plain) and not set(a) & set(b)
    assert a == block_keys(TOKENS, B, "m", "none", cache_salt="tenant-a")
    assert root_key("tenant-a") not in (ROOT_KEY, root_key("tenant-b"), *plain)
    # the salted chain is the ordinary chain from the salted root, and continues like any chain
    assert a[0] == block_key(root_key("tenant-a"), TOKENS[:B], "m", "none")
    assert block_keys(TOKENS[B:], B, "m", "none", parent_key=a[0]) == a[1:]
    assert block_keys(TOKENS, B, "m", "none", cache_salt="é" * 3) != block_keys(TOKENS, B, "m", "none",
                                                                                  cache_salt="e" * 3)


def test_router_key_follows_the_salt():
    p = list(range(30))
    assert prefix_key(p, cache_salt="t1") != prefix_key(p)
    assert prefix_key(p, cache_salt="t1") != prefix_key(p, cache_salt="t2")
    assert prefix_key(p, cache_salt="t1") == prefix_key(p[:16] + [9], cache_salt="t1")  # still the first block


@pytest.mark.parametrize("salt", ["", "x" * 257, 5, b"bytes"])
def test_bad_salt_names_cache_salt(salt):
    with pytest.raises(RequestError, match="cache_salt must be a non-empty string of at most 256"):
        SamplingParams(cache_salt=salt)
    with pytest.raises(ValueError, match="cache_salt"):
        root_key(salt)
    with pytest.raises(ValueError, match="cache_salt"):
        GenerateRequest(prompt="hi", cache_salt=salt)


def test_limits_agree_and_the_longest_salt_is_accepted():
    assert SAMPLING_MAX == MAX_CACHE_SALT_CHARS == 256
    salt = "s" * 256
    assert SamplingParams(cache_salt=salt).cache_salt == salt
    assert GenerateRequest(prompt="hi", cache_salt=salt).cache_salt == salt
    assert len(root_key(salt)) == 16
    with pytest.raises(ValueError, match="parent_key or cache_salt"):
        block_keys(TOKENS, B, "m", "none", parent_key=ROOT_KEY, cache_salt="t")


def _seq(rid, ids, salt=None):
    return Sequence(rid, list(ids), SamplingParams(max_tokens=4, temperature=0.0, cache_salt=salt))


def test_local_prefix_cache_hits_only_the_same_salt():
    bm = BlockManager(plan_pools(ModelCacheSpec((gqa_spec(2, 8),)), B), [64], B)
    a = _seq("a", TOKENS, "t1")
    assert a.cache_salt == "t1"
    bm.allocate(a, 40)
    a.num_computed = 40
    bm.free(a)  # blocks 0 and 1 complete: cached under t1's keys
    assert bm.keys(a, 2) == block_keys(TOKENS, B, "local", "none", cache_salt="t1")
    assert bm.match_prefix(_seq("b", TOKENS + [1], "t2")) == 0
    assert bm.match_prefix(_seq("c", TOKENS + [1])) == 0  # unsalted cannot see a salted prefix
    assert bm.match_prefix(_seq("d", TOKENS + [1], "t1")) == 2
    plain = _seq("e", TOKENS)
    bm.allocate(plain, 40)
    plain.num_computed = 40
    bm.free(plain)
    assert bm.keys(plain, 2) == block_keys(TOKENS, B, "local", "none")
    assert bm.match_prefix(_seq("f", TOKENS + [1])) == 2
    assert bm.match_prefix(_seq("g", TOKENS + [1], "t3")) == 0


def test_grpc_wire_carries_the_salt():
    from moeray.actors.frontend_wire import request_to_dict
    from moeray.clients.messages import build_request
    from moeray.clients.proto import moeray_pb2 as pb

    msg = pb.GenerateRequest.FromString(build_request("hi", cache_salt="tenant-a").SerializeToString())
    assert msg.HasField("cache_salt") and GenerateRequest(**request_to_dict(msg)).cache_salt == "tenant-a"
    unsalted = build_request("hi")
    assert not unsalted.HasField("cache_salt") and "cache_salt" not in request_to_dict(unsalted)
    with pytest.raises(ValueError, match="cache_salt"):  # set but empty is refused, not read as unset
        GenerateRequest(**request_to_dict(build_request("hi", cache_salt="")))
