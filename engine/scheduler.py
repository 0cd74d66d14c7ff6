"""Continuous batching with chunked prefill under a per-step token budget, paged blocks, preemption by recompute.

Each step: running sequences first (in admission order; decodes need one token, unfinished prefills a
chunk), then waiting ones are admitted while the token budget, the sequence limit and the free blocks allow.
When a running sequence needs a block and none is free, the latest-admitted running sequence not yet
scheduled this step is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed (prompt + what it generated so far) later.
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
                 prefix_lookup: Callable[[Sequence], list] | None = None) -> None:
        self.blocks = blocks
        self.prefix_lookup = prefix_lookup  # fetches stored leading blocks of a sequence (KV store)
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

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
            if self.prefix_lookup is not None and seq.num_computed == 0 and seq.prefix_payloads is None:
                seq.prefix_payloads = self.prefix_lookup(seq)
            cached = len(seq.prefix_payloads or ()) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq, cached + n):
                break
            self.waiting.popleft()
            seq.num_computed = cached
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(seq.request_id)
            budget -= n
        return chunks

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
