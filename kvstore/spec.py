"""What each attention kind caches, described once for the paged cache, the KV store and the codecs.

A layer's cache is a set of named tensors that grow with the sequence. Each tensor has a fixed row shape
and covers `tokens_per_row` tokens per row: 1 for raw K/V or an MLA latent, m for a DeepSeek-V4 compressed
row that pools m tokens. A paged block of B tokens therefore holds B // tokens_per_row rows of each tensor
(B must be a multiple of every tokens_per_row). `window` > 0 says only the last `window` tokens are ever
read (sliding-window attention), so older blocks of that tensor may be dropped.

Legend: B = tokens per block, R = rows per block (= B // tokens_per_row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class CacheTensorSpec:
    """One cached tensor of a layer: rows of shape `row_shape`, one row per `tokens_per_row` tokens."""

    name: str
    row_shape: tuple[int, ...]
    tokens_per_row: int = 1
    window: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        assert self.tokens_per_row >= 1, self
        assert all(d > 0 for d in self.row_shape), self
        assert self.window >= 0, self

    def rows_per_block(self, block_size: int) -> int:
        assert block_size % self.tokens_per_row == 0, (block_size, self)
        return block_size // self.tokens_per_row

    def row_numel(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n

    def bytes_per_token(self, itemsize: int | None = None) -> float:
        """Bytes this tensor costs per token of context, at `itemsize` bytes per element (default: dtype's)."""
        size = itemsize if itemsize is not None else torch.empty((), dtype=self.dtype).element_size()
        return self.row_numel() * size / self.tokens_per_row


@dataclass(frozen=True, slots=True)
class LayerCacheSpec:
    """Everything one attention layer caches. `kind` names the attention kind (gqa, mla, v4_window, ...)."""

    kind: str
    tensors: tuple[CacheTensorSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        assert len(names) == len(set(names)), f"duplicate cache tensor names in {names}"

    def block_multiple(self) -> int:
        """The smallest block size every tensor of this layer divides."""
        m = 1
        for t in self.tensors:
            m = _lcm(m, t.tokens_per_row)
        return m

    def bytes_per_token(self, itemsize: int | None = None) -> float:
        return sum(t.bytes_per_token(itemsize) for t in self.tensors)


@dataclass(frozen=True, slots=True)
class ModelCacheSpec:
    """The cache of a whole model: one LayerCacheSpec per decoder layer."""

    layers: tuple[LayerCacheSpec, ...]

    def block_multiple(self) -> int:
        m = 1
        for layer in self.layers:
            m = _lcm(m, layer.block_multiple())
        return m

    def bytes_per_token(self, itemsize: int | None = None) -> float:
        return sum(layer.bytes_per_token(itemsize) for layer in self.layers)

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError unless `block_size` is a multiple of every tensor's tokens_per_row."""
        m = self.block_multiple()
        if block_size <= 0 or block_size % m:
            raise ValueError(f"block_size={block_size} must be a positive multiple of {m} for this model's cache")


def gqa_spec(num_kv_heads: int, head_dim: int, v_head_dim: int | None = None, window: int = 0) -> LayerCacheSpec:
    """Grouped-query attention: K and V per KV head."""
    return LayerCacheSpec(
        kind="gqa",
        tensors=(
            CacheTensorSpec("k", (num_kv_heads, head_dim), window=window),
            CacheTensorSpec("v", (num_kv_heads, v_head_dim or head_dim), window=window),
        ),
    )


def mla_spec(kv_lora_rank: int, rope_dim: int) -> LayerCacheSpec:
    """Multi-head latent attention: the normalised compressed latent and the shared rope key."""
    return LayerCacheSpec(
        kind="mla",
        tensors=(CacheTensorSpec("latent", (kv_lora_rank,)), CacheTensorSpec("k_rope", (rope_dim,))),
    )


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
