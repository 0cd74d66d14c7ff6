"""Per-request sampling parameters and the per-step output a request produces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moeray.common.errors import RequestError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs; vLLM's default max_logprobs is 20 too
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")
MAX_CACHE_SALT_CHARS = 256  # as kvstore/keys.py's (common imports no kvstore)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. temperature 0 means greedy.

    max_tokens counts generated tokens only. The model's EOS stops generation unless ignore_eos is set;
    stop_token_ids and stop strings always stop (the stop string is cut from the returned text). Until
    min_tokens tokens are generated, EOS and stop_token_ids are masked out.

    Penalties follow vLLM: presence/frequency subtract from the logits of tokens already generated (once, and
    once per occurrence); repetition_penalty divides positive (multiplies negative) logits of tokens seen in the
    prompt or the output. logit_bias adds to the logits of the given ids. min_p drops tokens whose probability is
    below min_p times the most likely one's. logprobs returns the sampled token's log-probability (of the raw model
    distribution); top_logprobs > 0 returns that many alternatives too. `structured` constrains the output to a
    grammar: {"kind": "json" | "regex" | "choice" | "grammar", "value": str}, compiled in the engine.
    prompt_logprobs = k returns, per prompt position after the first, the prompt token's log-probability, its rank
    and k alternatives (vLLM's prompt_logprobs); such a request computes its whole prompt (no prefix reuse).
    cache_salt (vLLM's) salts the request's prefix-cache and KV-store keys (kvstore/keys.py root_key): it reuses
    only blocks of requests with the same salt.
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0
    structured: dict[str, Any] | None = None
    prompt_logprobs: int | None = None  # None = off; k >= 0: each prompt token's logprob plus k alternatives
    cache_salt: str | None = None  # None = unsalted keys; a tenant's salt isolates its cached prefixes

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RequestError naming the field when a value is out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _finite(self, "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise RequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or tok < 0:
                raise RequestError(f"logit_bias keys must be non-negative token ids, got {tok!r}")
            if not isinstance(bias, int | float) or not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias[{tok}] must be in [-100, 100], got {bias!r}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
        if any((not isinstance(s, str)) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, got {self.stop}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS):
            got = f"{len(self.cache_salt)} characters" if isinstance(self.cache_salt, str) else repr(self.cache_salt)
            raise RequestError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                               f"characters, got {got}")
        if self.structured is not None:
            kind, value = self.structured.get("kind"), self.structured.get("value")
            if kind not in STRUCTURED_KINDS or not isinstance(value, str) or not value:
                raise RequestError(f"structured must be {{'kind': one of {STRUCTURED_KINDS}, 'value': a non-empty "
                                   f"string}}, got {self.structured!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Nothing but the logits' argmax or a plain draw: no penalty, bias, mask or minimum length."""
        return (self.presence_penalty == 0.0 and self.frequency_penalty == 0.0 and self.repetition_penalty == 1.0
                and not self.logit_bias and self.min_tokens == 0 and self.structured is None)


def _finite(params: SamplingParams, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}")


TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first
# Per prompt position: None for the first (nothing predicts it), else (the prompt token's log-probability, its
# rank in the vocabulary (1 = most likely), the top-k alternatives).
PromptLogprobs = list[tuple[float, int, TopLogprobs] | None]


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
    top_logprobs: list[TopLogprobs] | None = None  # per generated token, when the request asked for them
    prompt_logprobs: PromptLogprobs | None = None  # per prompt position, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, d: StepDelta) -> None:
        """Fold one step's delta in: ids, logprobs, top / prompt logprobs, and on the last delta its finish."""
        self.token_ids.extend(d.token_ids)
        if d.logprobs and self.logprobs is not None:
            self.logprobs.extend(d.logprobs)
        if d.top_logprobs:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.extend(d.top_logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.num_cached_tokens = d.finish_reason, d.num_cached_tokens


@dataclass(slots=True)
class StepDelta:
    """The tokens one request gained in one engine step (one message per step for all sequences)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # on the last delta: prompt tokens whose KV came from the KV store
    top_logprobs: list[TopLogprobs] | None = None  # one list per token in token_ids, when asked for
    prompt_logprobs: PromptLogprobs | None = None  # on the request's first token's delta, when asked for
