"""Runs one scheduled batch through the dense part, the routed experts through the transport.

The batch is flattened (all chunks' tokens in order) and optionally split into micro-batches that run as a
ping-pong (MegaScale-Infer): each micro-batch is a flow through the layers that pauses at every MoE layer's
expert call; while micro-batch A's experts run, B's attention, gate and shared expert run, and A's next layer
starts as soon as A's experts answered (not when every micro-batch's have). `micro_batches=0` chooses from the
step: 2 when the transport overlaps (experts computing on resources of their own, e.g. accelerators) and the
step has at least AUTO_MIN_SEQS sequences, else 1 (splitting a tiny batch only adds calls; so does splitting on
CPU expert actors that share the gating actor's cores: measured slower at B = 16 and 64 on 2 cores).
Rows whose experts could not be computed (ExpertRowsFailed) fail only their chunks: `failed` maps those chunks'
indices to the reason after `run`; every other chunk's logits are exact.
Legend: N = tokens in the batch, V = vocab, S = sequences sampled this step.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from dataclasses import dataclass

import torch

from moeray.engine.paged_cache import PagedKVCache
from moeray.engine.scheduler import ScheduledChunk
from moeray.engine.transport import ExpertRowsFailed, ExpertTransport
from moeray.models.dense import SeqBatch, SeqChunk

AUTO_MIN_SEQS = 8  # micro_batches=0: split steps with at least this many sequences in two


@dataclass(slots=True)
class MicroBatch:
    token_ids: torch.Tensor  # [N]
    seqs: SeqBatch  # of SeqChunk; carries the per-step attention metadata
    logit_rows: torch.Tensor  # rows whose logits are needed (last token of sampling chunks)
    prompt_rows: list[tuple[str, torch.Tensor]]  # (request id, rows predicting its prompt tokens): prompt_logprobs


class ModelRunner:
    def __init__(self, dense: torch.nn.Module, cache: PagedKVCache, transport: ExpertTransport,
                 micro_batches: int = 1) -> None:
        self.dense, self.cache, self.transport = dense, cache, transport
        self.device = cache.device  # the engine's device: token ids and row indices are built there
        self.micro_batches = micro_batches  # 0: chosen per step
        self.failed: dict[int, str] = {}  # after run: chunk index -> why its rows could not be computed
        self.prompt_logits: dict[str, torch.Tensor] = {}  # after run: request id -> [m, V] (prompt_logprobs)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Compute the chunks' KV and return logits [S, V] for the chunks that sample, in chunk order."""
        parts = split_chunks(chunks, self.num_micro_batches(chunks))
        mbs = [self._micro_batch(part) for part in parts]
        firsts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]  # index of each part's first chunk
        self.failed = {}
        states: list[torch.Tensor | None] = [None] * len(mbs)
        flows = [self._flow(mb) for mb in mbs]
        calls: collections.deque = collections.deque()  # (micro-batch, expert call) in submission order
        for i in range(len(mbs)):
            self._resume(i, flows[i], None, calls, states)
        while calls:
            i, handle = calls.popleft()
            try:
                y = self.transport.wait(handle)
            except ExpertRowsFailed as e:  # fail only the chunks owning these rows; the others keep going
                y = e.output
                self._fail_rows(parts[i], firsts[i], e.rows, str(e))
            self._resume(i, flows[i], y, calls, states)
        rows = [self.dense.logits(s[mb.logit_rows]) for s, mb in zip(states, mbs, strict=True) if mb.logit_rows.numel()]
        self.prompt_logits = {rid: self.dense.logits(s[r]) for s, mb in zip(states, mbs, strict=True)
                              for rid, r in mb.prompt_rows}
        return torch.cat(rows) if rows else torch.empty(0, self.dense.cfg.vocab_size, device=self.device)

    def num_micro_batches(self, chunks: list[ScheduledChunk]) -> int:
        if self.micro_batches:
            return self.micro_batches
        return 2 if getattr(self.transport, "overlaps", False) and len(chunks) >= AUTO_MIN_SEQS else 1

    def _flow(self, mb: MicroBatch) -> Generator:
        """One micro-batch through every layer: yields each MoE layer's expert call, is resumed with its output
        [N, D], returns the final hidden states [N, D]."""
        h = self.dense.embed(mb.token_ids)
        for layer in self.dense.layers:
            h = layer.attention(h, mb.seqs)
            x, ctx = layer.mlp_input(h)
            if not layer.is_moe:
                h = layer.mlp_output(h, ctx, layer.dense_mlp(x))
                continue
            ids, w = layer.route(x, mb.token_ids)
            handle = self.transport.submit(layer.layer_id, x, ids, w)
            shared = layer.shared(x)  # computed while this call's experts run
            y = yield handle
            h = layer.mlp_output(h, ctx, y if shared is None else y + shared)
        return h

    @staticmethod
    def _resume(i: int, flow: Generator, y: torch.Tensor | None, calls: collections.deque,
                states: list[torch.Tensor | None]) -> None:
        try:
            calls.append((i, flow.send(y)))
        except StopIteration as done:
            states[i] = done.value

    def _fail_rows(self, part: list[ScheduledChunk], first: int, rows: torch.Tensor, why: str) -> None:
        ends = torch.tensor([c.num_tokens for c in part]).cumsum(0)  # [C] exclusive end row of each chunk
        for j in torch.searchsorted(ends, rows, right=True).unique().tolist():
            self.failed[first + j] = why

    def _micro_batch(self, chunks: list[ScheduledChunk]) -> MicroBatch:
        ids, seqs, logit_rows, prompt_rows, off = [], SeqBatch(), [], [], 0
        for c in chunks:
            ids.extend(c.seq.all_ids[c.start:c.start + c.num_tokens])
            seqs.append(SeqChunk(c.num_tokens, c.start, self.cache.view(c.seq.block_table)))
            if c.seq.params.prompt_logprobs is not None and not c.seq.output_ids:  # positions start.. P-2
                end = min(c.start + c.num_tokens, len(c.seq.prompt_ids) - 1)
                if end > c.start:
                    prompt_rows.append((c.seq.request_id, torch.arange(off, off + end - c.start, device=self.device)))
            off += c.num_tokens
            if c.samples:
                logit_rows.append(off - 1)
        return MicroBatch(torch.tensor(ids, dtype=torch.long, device=self.device), seqs,
                          torch.tensor(logit_rows, dtype=torch.long, device=self.device), prompt_rows)


def split_chunks(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """Split into up to `parts` contiguous groups of roughly equal token counts (order kept)."""
    if parts <= 1 or len(chunks) < 2:
        return [chunks]
    total = sum(c.num_tokens for c in chunks)
    groups: list[list[ScheduledChunk]] = [[]]
    acc = 0
    for c in chunks:
        # a new group once this chunk's middle lies past the current group's share (2 chunks: always split)
        if groups[-1] and len(groups) < parts and acc + c.num_tokens / 2 > total * len(groups) / parts:
            groups.append([])
        groups[-1].append(c)
        acc += c.num_tokens
    return groups
