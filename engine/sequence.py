"""A request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moeray.common.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """Prompt + generated tokens; `num_computed` of them have their KV in the cache (blocks in `block_table`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    num_cached_prefix: int = 0  # tokens whose KV came from the KV store instead of being computed
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: int = 0  # admission order; preemption evicts the latest arrival first
    num_preemptions: int = 0
    prefix_payloads: list | None = None  # blocks fetched from the KV store, written into the cache at admission

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cache_salt(self) -> str | None:
        """The request's cache salt (vLLM's cache_salt): its blocks' keys start from root_key(salt)."""
        return self.params.cache_salt

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
