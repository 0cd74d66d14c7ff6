"""Runs one scheduled batch through the dense part, the routed experts through the transport.

The batch is flattened (all chunks' tokens in order) and optionally split into micro-batches: per layer,
each micro-batch's attention and gate run, then its expert call is submitted; while the experts of one
micro-batch run, the next micro-batch's attention and every micro-batch's shared expert are computed.
Legend: N = tokens in the batch, V = vocab, S = sequences sampled this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeray.engine.paged_cache import PagedKVCache
from moeray.engine.scheduler import ScheduledChunk
from moeray.engine.transport import ExpertTransport
from moeray.models.dense import SeqChunk


@dataclass(slots=True)
class MicroBatch:
    token_ids: torch.Tensor  # [N]
    seqs: list[SeqChunk]
    logit_rows: torch.Tensor  # rows whose logits are needed (last token of sampling chunks)


class ModelRunner:
    def __init__(self, dense: torch.nn.Module, cache: PagedKVCache, transport: ExpertTransport,
                 micro_batches: int = 1) -> None:
        self.dense, self.cache, self.transport = dense, cache, transport
        self.micro_batches = micro_batches

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Compute the chunks' KV and return logits [S, V] for the chunks that sample, in chunk order."""
        mbs = [self._micro_batch(part) for part in split_chunks(chunks, self.micro_batches)]
        states = [self.dense.embed(mb.token_ids) for mb in mbs]
        for layer in self.dense.layers:
            pending = []
            for i, mb in enumerate(mbs):
                states[i] = layer.attention(states[i], mb.seqs)
                x, ctx = layer.mlp_input(states[i])
                if layer.is_moe:
                    ids, w = layer.route(x, mb.token_ids)
                    pending.append((i, x, ctx, self.transport.submit(layer.layer_id, x, ids, w)))
                else:
                    states[i] = layer.mlp_output(states[i], ctx, layer.dense_mlp(x))
            for i, x, ctx, handle in pending:
                shared = layer.shared(x)  # overlaps with the expert calls in flight
                y = self.transport.wait(handle)
                states[i] = layer.mlp_output(states[i], ctx, y if shared is None else y + shared)
        rows = [self.dense.logits(s[mb.logit_rows]) for s, mb in zip(states, mbs, strict=True) if mb.logit_rows.numel()]
        return torch.cat(rows) if rows else torch.empty(0, self.dense.cfg.vocab_size)

    def _micro_batch(self, chunks: list[ScheduledChunk]) -> MicroBatch:
        ids, seqs, logit_rows, off = [], [], [], 0
        for c in chunks:
            ids.extend(c.seq.all_ids[c.start:c.start + c.num_tokens])
            seqs.append(SeqChunk(c.num_tokens, c.start, self.cache.view(c.seq.block_table)))
            off += c.num_tokens
            if c.samples:
                logit_rows.append(off - 1)
        return MicroBatch(torch.tensor(ids, dtype=torch.long), seqs, torch.tensor(logit_rows, dtype=torch.long))


def split_chunks(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """Split into up to `parts` contiguous groups of roughly equal token counts (order kept)."""
    if parts <= 1 or len(chunks) < 2:
        return [chunks]
    total = sum(c.num_tokens for c in chunks)
    groups: list[list[ScheduledChunk]] = [[]]
    acc = 0
    for c in chunks:
        if acc >= total * len(groups) / parts and len(groups) < parts and groups[-1]:
            groups.append([])
        groups[-1].append(c)
        acc += c.num_tokens
    return groups
