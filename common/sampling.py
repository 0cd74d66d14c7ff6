"""Per-request sampling parameters and the per-step output a request produces."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeray.common.errors import RequestError


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. temperature 0 means greedy.

    max_tokens counts generated tokens only. The model's EOS stops generation unless ignore_eos is set;
    stop_token_ids and stop strings always stop (the stop string is cut from the returned text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RequestError naming the field when a value is out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
        if any((not isinstance(s, str)) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, got {self.stop}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one request produced. token_ids are the generated ids only (prompt excluded)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "cancelled" | "error: ..."
    text: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the KV store instead of being computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class StepDelta:
    """The tokens one request gained in one engine step (one message per step for all sequences)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # on the last delta: prompt tokens whose KV came from the KV store
