"""What a DeepSeek-V4 layer caches, as `LayerCacheSpec`s for the paged cache and the KV store.

Every layer keeps its sliding window of raw K=V rows. A compressed layer also keeps its compressed rows (one
per m tokens, never dropped) and, for the tokens of a not-yet-complete compression window, the compressor's
raw per-token projections (`*_raw`: row 0 = kv projection, row 1 = gate logits before the position bias).
Caching the raw projections, rather than keeping running state on the module, makes any chunking of a
sequence (chunked prefill, decode, a prefix restored from the KV store at a block boundary) recompute
exactly the rows a one-shot prefill computes; they are windowed, so only the last (1 + overlap) * m tokens
are ever read.

| tensor      | layers   | row shape     | tokens_per_row | window  |
|-------------|----------|---------------|----------------|---------|
| kv          | all      | [Dh]          | 1              | W       |
| comp        | CSA, HCA | [Dh]          | m (CSA), m' (HCA) | 0    |
| comp_raw    | CSA      | [2, 2 Dh]     | 1              | 2m      |
| comp_raw    | HCA      | [2, Dh]       | 1              | m'      |
| index       | CSA      | [Di]          | m              | 0       |
| index_raw   | CSA      | [2, 2 Di]     | 1              | 2m      |

Legend: Dh = head_dim, Di = index_head_dim, W = sliding_window, m / m' = CSA / HCA compress rates.
"""

from __future__ import annotations

from moeray.kvstore.spec import CacheTensorSpec, LayerCacheSpec, ModelCacheSpec
from moeray.models.v4.config import CSA, HCA, SLIDING, V4Extra


def v4_layer_spec(x: V4Extra, head_dim: int, layer_type: str) -> LayerCacheSpec:
    """The cache of one V4 layer of `layer_type` (sliding_attention / compressed_sparse / heavily_compressed)."""
    window = CacheTensorSpec("kv", (head_dim,), window=x.sliding_window)
    if layer_type == SLIDING:
        return LayerCacheSpec("v4_window", (window,))
    if layer_type == HCA:
        m = x.hca_rate
        return LayerCacheSpec("v4_hca", (
            window,
            CacheTensorSpec("comp", (head_dim,), tokens_per_row=m),
            CacheTensorSpec("comp_raw", (2, head_dim), window=m),
        ))
    assert layer_type == CSA, layer_type
    m, di = x.csa_rate, x.index_head_dim
    return LayerCacheSpec("v4_csa", (
        window,
        CacheTensorSpec("comp", (head_dim,), tokens_per_row=m),
        CacheTensorSpec("comp_raw", (2, 2 * head_dim), window=2 * m),
        CacheTensorSpec("index", (di,), tokens_per_row=m),
        CacheTensorSpec("index_raw", (2, 2 * di), window=2 * m),
    ))


def held_bytes(spec: ModelCacheSpec, num_tokens: int, itemsize: int = 4) -> int:
    """Bytes one sequence of `num_tokens` tokens holds when windowed tensors keep only their window.

    A tensor with tokens_per_row t holds num_tokens // t rows; a windowed one at most its window's tokens.
    (A paged cache rounds both up to whole blocks.)
    """
    total = 0
    for layer in spec.layers:
        for t in layer.tensors:
            tokens = min(num_tokens, t.window) if t.window else num_tokens
            total += (tokens // t.tokens_per_row) * t.row_numel() * itemsize
    return total
