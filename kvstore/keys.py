"""Block keys: a hash chain over full blocks of token ids.

    key[0] = H(ROOT_KEY, tokens[0:B],   model_id, codec)
    key[i] = H(key[i-1], tokens[iB:(i+1)B], model_id, codec)

H is blake2b with a 16-byte digest. A key therefore names the whole prefix up to the end of its block, not
just the block's own tokens: equal prefixes give equal keys, and a token that differs changes its block's key
and every key after it. `model_id` must change whenever the weights or the cache layout change (it is the
only thing that ties a key to a model), and `codec` is hashed so blocks stored lossily never answer a
bit-exact lookup. Only full blocks are keyed; a partial tail block is not shareable.

Per-tenant salt (vLLM's `cache_salt`). A request that carries a salt starts its chain from
`root_key(salt)` = H_salt(salt) instead of ROOT_KEY, so every one of its keys differs from the unsalted ones
and from those of any other salt: it can only hit blocks written by requests with the same salt, and a
tenant cannot probe (by timing or by cached_tokens) whether another tenant's prompt prefix is cached. No salt
gives ROOT_KEY, i.e. exactly the unsalted keys.

Rows that cover more than one token. A cache tensor with tokens_per_row = m (DeepSeek-V4's compressed rows
pool m tokens) holds B / m rows per block of B tokens; the block size is always a multiple of every m
(`ModelCacheSpec.check_block_size`), so row j of a block pools tokens [jm, (j+1)m) of that block and no row
straddles two blocks. Every cached row -- raw K/V, an MLA latent, or a compressed row, even one whose pooling
window reaches back into earlier blocks -- is a function of the tokens up to the end of its block only, which
is exactly what the chain key covers. So one key covers all layers' rows of a block: the B rows of K/V and
the B / m compressed rows alike. If a model's m exceeds the engine's preferred block size, the block size is
raised to a multiple of m rather than keying a row by the last block it completes.

Legend: B = block_size (tokens per block), N = number of tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
ROOT_KEY = bytes(KEY_BYTES)  # the parent of a sequence's first block
_PERSON = b"moeray.kv.key.v1"  # blake2b personalisation: these digests never collide with other uses
_SALT_PERSON = b"moeray.kv.salt1"  # a salted root is never a block key, nor ROOT_KEY
MAX_CACHE_SALT_CHARS = 256


def root_key(cache_salt: str | None = None) -> bytes:
    """The parent of a sequence's first block: ROOT_KEY without a salt, else a 16-byte digest of the salt."""
    if cache_salt is None:
        return ROOT_KEY
    if not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS:
        got = f"{len(cache_salt)} characters" if isinstance(cache_salt, str) else repr(cache_salt)
        raise ValueError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters, "
                         f"got {got}")
    return hashlib.blake2b(cache_salt.encode("utf-8"), digest_size=KEY_BYTES, person=_SALT_PERSON).digest()


def block_key(parent_key: bytes, block_token_ids: Sequence[int], model_id: str, codec: str) -> bytes:
    """The key of one block whose predecessor's key is `parent_key` (root_key(salt) for the first block)."""
    return _chain(_base_hasher(model_id, codec), parent_key, _token_bytes(block_token_ids))


def block_keys(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    codec: str,
    parent_key: bytes | None = None,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Keys of every full block of `token_ids` ([N] ints), in order; N // B keys.

    `parent_key` continues an existing chain (the key of the block just before `token_ids[0]`); without it the
    chain starts at root_key(cache_salt)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if parent_key is not None and cache_salt is not None:
        raise ValueError("give parent_key or cache_salt, not both (a continued chain already carries its salt)")
    tokens = _token_array(token_ids)  # [N] little-endian int64
    num_blocks = len(tokens) // block_size
    base = _base_hasher(model_id, codec)
    keys: list[bytes] = []
    key = root_key(cache_salt) if parent_key is None else parent_key
    for i in range(num_blocks):
        key = _chain(base, key, tokens[i * block_size : (i + 1) * block_size].tobytes())
        keys.append(key)
    return keys


def _base_hasher(model_id: str, codec: str) -> hashlib.blake2b:
    """A hasher already fed the per-model fields; copied once per block."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON)
    for field in (model_id, codec):
        raw = field.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(raw)
    return h


def _chain(base: hashlib.blake2b, parent_key: bytes, token_bytes: bytes) -> bytes:
    if not isinstance(parent_key, bytes) or len(parent_key) != KEY_BYTES:
        raise ValueError(f"parent_key must be {KEY_BYTES} bytes, got {parent_key!r}")
    h = base.copy()
    h.update(parent_key)
    h.update((len(token_bytes) // 8).to_bytes(4, "little"))
    h.update(token_bytes)
    return h.digest()


def _token_array(token_ids: Sequence[int]) -> np.ndarray:
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be one sequence of ints, got shape {tokens.shape}")
    if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0):
        raise ValueError("token_ids must be non-negative integers")
    return tokens.astype("<i8", copy=False)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return _token_array(token_ids).tobytes()
