"""Continuous batching with chunked prefill under a per-step token budget, paged blocks, preemption by recompute.

Each step: running sequences first (in admission order; decodes need one token, unfinished prefills a
chunk), then waiting ones are admitted while the token budget, the sequence limit and the free pages of every
pool allow. At admission the longest prefix the local cache holds is shared (block_manager.py), then the KV
store is asked for the blocks after it; only the rest is computed. When a running sequence needs a page and
none is free, the latest-admitted running sequence not yet scheduled this step is preempted: its pages are
released (complete blocks stay cached) and it goes back to the front of the queue to be recomputed (prompt +
what it generated so far) later, from whatever of it is still cached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moeray.engine.block_manager import BlockManager
from moeray.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 prefix_lookup: Callable[[Sequence, int], list] | None = None,
                 prefix_prefetch: Callable[[Sequence], None] | None = None) -> None:
        self.blocks = blocks
        self.prefix_lookup = prefix_lookup  # (seq, first block) -> stored blocks from there on (KV store)
        self.prefix_prefetch = prefix_prefetch  # starts that lookup early, off the step thread
        self._fetched: dict[str, tuple[int, list]] = {}  # request -> (first block, stored blocks) until admitted
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if self.prefix_prefetch is not None:
            self.prefix_prefetch(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending, budget)
            if not self._make_room(seq, seq.num_computed + n, scheduled):
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(seq.request_id)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self._share_prefix(seq)
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq, cached + n, start=cached):
                self.blocks.free(seq)  # give the shared pages back; the stored blocks are kept for next time
                seq.prefix_payloads = None
                break
            self.waiting.popleft()
            self._fetched.pop(seq.request_id, None)
            seq.num_computed = seq.num_cached_prefix = cached
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(seq.request_id)
            budget -= n
        return chunks

    def _share_prefix(self, seq: Sequence) -> int:
        """Share the locally cached leading blocks of a waiting `seq`, fetch the stored ones after them (into
        seq.prefix_payloads, written by the engine); returns the tokens whose KV need not be computed."""
        if seq.params.prompt_logprobs is not None and not seq.output_ids:  # every prompt position's logits
            seq.prefix_payloads = None
            return 0
        b = self.blocks.block_size
        local = self.blocks.match_prefix(seq)
        self.blocks.acquire_prefix(seq, local)
        if self.prefix_lookup is not None:
            first, stored = self._fetched.get(seq.request_id, (local + 1, []))
            if first > local:  # nothing fetched yet, or from a later block than now needed
                first, stored = local, self.prefix_lookup(seq, local)
                self._fetched[seq.request_id] = (first, stored)
            seq.prefix_payloads = stored[local - first:]
        return (local + len(seq.prefix_payloads or ())) * b

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """Register the blocks the step completed and release window pages no future query reads."""
        for c in chunks:
            if c.seq.status is SeqStatus.RUNNING:
                self.blocks.trim(c.seq)

    def _make_room(self, seq: Sequence, upto: int, scheduled: set[str]) -> bool:
        """Preempt latest arrivals until `seq` can grow to `upto` tokens; False if `seq` itself was preempted."""
        while not self.blocks.can_allocate(seq, upto):
            victims = [s for s in self.running if s.request_id not in scheduled and s is not seq]
            victim = max(victims, key=lambda s: s.arrival) if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it for recomputation (mutates seq)."""
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.prefix_payloads = None  # look the store up again at re-admission
        self._fetched.pop(seq.request_id, None)
        if self.prefix_prefetch is not None:
            self.prefix_prefetch(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and free its blocks (mutates seq)."""
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._fetched.pop(seq.request_id, None)
