"""Paged KV blocks: a free list, per-sequence block tables, `can_allocate` / `allocate` pairs."""

from __future__ import annotations

from collections import deque

from moeray.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, upto_tokens: int) -> bool:
        """Whether the blocks to hold `upto_tokens` tokens of `seq` are available."""
        return self.blocks_for(upto_tokens) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence, upto_tokens: int) -> None:
        """Grow `seq`'s block table to hold `upto_tokens` tokens (mutates seq). Call can_allocate first."""
        need = self.blocks_for(upto_tokens) - len(seq.block_table)
        assert need <= len(self._free), (need, len(self._free))
        for _ in range(max(0, need)):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks (mutates seq)."""
        self._free.extend(seq.block_table)
        seq.block_table = []
