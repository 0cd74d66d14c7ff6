"""The serving API's edge: request validation, the front end's config, the Backend contract, text streaming.

The gRPC front end (and later the HTTP API) turns a wire request into a dict, validates it here with
`parse_generate_request`, and talks to the engine through `Backend`. Every rejection is a
`RequestValidationError` whose message starts with the offending field's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moeray.common.errors import RequestError
from moeray.common.sampling import SamplingParams, StepDelta

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_PROMPT_BYTES = 1 << 20


class RequestValidationError(RequestError):
    """A request field is invalid. `fields` lists the offending fields; the message names each one."""

    def __init__(self, message: str, fields: Sequence[str]) -> None:
        super().__init__(message)
        self.fields = list(fields)

    @classmethod
    def single(cls, field: str, problem: str) -> RequestValidationError:
        return cls(f"{field}: {problem}", [field])


class ModelSpec(BaseModel):
    """What the front end knows about a served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    max_context: int = Field(gt=0, description="prompt + generated tokens at most")
    vocab_size: int = Field(gt=0)


class GenerateRequest(BaseModel):
    """One generation request as it arrives, before tokenization.

    Static checks run always; checks against the served models (model name, vocabulary, context, prompt
    size) run when validated through `parse_generate_request`, which passes them in the validation context.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = Field(default_factory=list)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = ""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    top_logprobs: int = 0
    structured: dict[str, str] | None = None  # {"kind": "json" | "regex" | "choice" | "grammar", "value": ...}

    @field_validator("prompt")
    @classmethod
    def _prompt_is_utf8(cls, prompt: str) -> str:
        _check_utf8(prompt, "")
        return prompt

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_positive(cls, max_tokens: int) -> int:
        if max_tokens <= 0:
            raise ValueError(f"must be > 0, got {max_tokens}")
        return max_tokens

    @field_validator("temperature")
    @classmethod
    def _temperature_non_negative(cls, temperature: float) -> float:
        if temperature < 0:
            raise ValueError(f"must be >= 0 (0 = greedy), got {temperature}")
        return temperature

    @field_validator("top_p")
    @classmethod
    def _top_p_in_unit_interval(cls, top_p: float) -> float:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"must be in (0, 1], got {top_p}")
        return top_p

    @field_validator("top_k")
    @classmethod
    def _top_k_non_negative(cls, top_k: int) -> int:
        if top_k < 0:
            raise ValueError(f"must be >= 0 (0 = off), got {top_k}")
        return top_k

    @field_validator("seed")
    @classmethod
    def _seed_is_int64(cls, seed: int | None) -> int | None:
        if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
            raise ValueError(f"must fit in a signed 64-bit integer, got {seed}")
        return seed

    @field_validator("stop")
    @classmethod
    def _stop_strings_usable(cls, stop: list[str]) -> list[str]:
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for i, s in enumerate(stop):
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] must hold 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
            _check_utf8(s, f"stop[{i}] is ")
        return stop

    @field_validator("request_id")
    @classmethod
    def _request_id_printable(cls, request_id: str) -> str:
        if len(request_id) > MAX_REQUEST_ID_CHARS or not (request_id.isprintable() and request_id.isascii()):
            raise ValueError(f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters")
        return request_id

    @model_validator(mode="after")
    def _check_input(self) -> GenerateRequest:
        if self.prompt and self.prompt_token_ids:
            raise ValueError("prompt: give either prompt or prompt_token_ids, not both")
        if not self.prompt and not self.prompt_token_ids:
            raise ValueError("prompt: empty; give a non-empty prompt or prompt_token_ids")
        return self

    @model_validator(mode="after")
    def _check_sampling(self) -> GenerateRequest:
        try:  # the engine's own checks (SamplingParams names the field first: "min_p must be in [0, 1] ...")
            to_sampling_params(self)
        except RequestError as e:
            field, _, problem = str(e).partition(" ")
            name = field.split("[")[0]  # "logit_bias[5] must be ..." names logit_bias
            raise ValueError(f"{name}: {field[len(name):]} {problem}".replace(":  ", ": ")) from None
        return self

    @model_validator(mode="after")
    def _check_against_model(self, info: ValidationInfo) -> GenerateRequest:
        context = info.context or {}
        models: Mapping[str, ModelSpec] | None = context.get("models")
        if models is None:
            return self
        spec = _resolve_model(self.model, models)
        self.model = spec.name
        max_prompt_bytes = context.get("max_prompt_bytes", DEFAULT_MAX_PROMPT_BYTES)
        if len(self.prompt) > max_prompt_bytes or len(self.prompt.encode()) > max_prompt_bytes:
            raise ValueError(f"prompt: longer than {max_prompt_bytes} bytes; send a shorter prompt")
        _check_token_ids(self.prompt_token_ids, "prompt_token_ids", spec.vocab_size)
        _check_token_ids(self.stop_token_ids, "stop_token_ids", spec.vocab_size)
        _check_token_ids(list(self.logit_bias), "logit_bias", spec.vocab_size)
        if self.max_tokens >= spec.max_context:
            raise ValueError(
                f"max_tokens: {self.max_tokens} leaves no room for a prompt in the context of "
                f"{spec.max_context} tokens; ask for fewer"
            )
        if self.prompt_token_ids:
            check_fits_context(len(self.prompt_token_ids), self.max_tokens, spec)
        return self


def _check_utf8(text: str, what: str) -> None:
    # A Python str is only non-encodable when it holds lone surrogates (e.g. from surrogateescape).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}not valid UTF-8 (character {e.start} is a lone surrogate)") from None


def _check_token_ids(ids: Sequence[int], field: str, vocab_size: int) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}: id {t} at position {i} is outside the vocabulary [0, {vocab_size})")


def _resolve_model(name: str, models: Mapping[str, ModelSpec]) -> ModelSpec:
    if not name and len(models) == 1:
        return next(iter(models.values()))
    if name in models:
        return models[name]
    served = ", ".join(sorted(models)) or "(none)"
    if not name:
        raise ValueError(f"model: required when several models are served; served: {served}")
    raise ValueError(f"model: unknown model {name!r}; served: {served}")


def check_fits_context(num_prompt_tokens: int, max_tokens: int, spec: ModelSpec) -> None:
    """Raise ValueError naming prompt or max_tokens when prompt + max_tokens exceed the model context."""
    if num_prompt_tokens >= spec.max_context:
        raise ValueError(
            f"prompt: {num_prompt_tokens} tokens leave no room to generate in the context of "
            f"{spec.max_context} tokens; shorten the prompt"
        )
    if num_prompt_tokens + max_tokens > spec.max_context:
        raise ValueError(
            f"max_tokens: prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the "
            f"context of {spec.max_context} tokens; set max_tokens to at most "
            f"{spec.max_context - num_prompt_tokens}"
        )


def parse_generate_request(
    data: Mapping[str, Any],
    models: Mapping[str, ModelSpec],
    *,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> GenerateRequest:
    """Validate a request against the served models; `model` comes back resolved to a served name.

    Raises RequestValidationError whose message names every offending field.
    """
    context = {"models": models, "max_prompt_bytes": max_prompt_bytes}
    try:
        return GenerateRequest.model_validate(dict(data), context=context)
    except ValidationError as e:
        raise _translate(e) from None


def validate_prompt_length(request: GenerateRequest, num_prompt_tokens: int, spec: ModelSpec) -> None:
    """After tokenizing a text prompt: RequestValidationError when it does not fit the context."""
    try:
        check_fits_context(num_prompt_tokens, request.max_tokens, spec)
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        raise RequestValidationError.single(field, problem) from None


def _translate(error: ValidationError) -> RequestValidationError:
    """pydantic errors -> one message, "field: problem; field: problem"."""
    parts, fields = [], []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if loc:
            field = loc[0]
            where = field + "".join(f"[{p}]" for p in loc[1:])
            parts.append(f"{where}: {message}")
        else:  # a model-level check; its message already starts with the field name
            field = message.partition(":")[0]
            parts.append(message)
        if field not in fields:
            fields.append(field)
    return RequestValidationError("; ".join(parts), fields)


def to_sampling_params(request: GenerateRequest) -> SamplingParams:
    """The engine's view of a validated request."""
    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=float(request.temperature),
        top_k=request.top_k,
        top_p=float(request.top_p),
        seed=request.seed,
        stop_token_ids=list(request.stop_token_ids),
        stop=list(request.stop),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs or request.top_logprobs > 0,
        min_p=float(request.min_p),
        presence_penalty=float(request.presence_penalty),
        frequency_penalty=float(request.frequency_penalty),
        repetition_penalty=float(request.repetition_penalty),
        min_tokens=request.min_tokens,
        logit_bias={int(k): float(v) for k, v in request.logit_bias.items()},
        top_logprobs=request.top_logprobs,
        structured=dict(request.structured) if request.structured else None,
    )


class FrontendConfig(BaseModel):
    """How the gRPC front end listens and admits requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int = Field(256, gt=0, description="requests admitted at once; more get RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(4 << 20, gt=0, description="gRPC receive limit per message")
    max_prompt_bytes: int = Field(DEFAULT_MAX_PROMPT_BYTES, gt=0)
    auth_token: SecretStr | None = None
    auth_token_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    grace_s: float = Field(5.0, ge=0, description="how long stop() lets in-flight requests finish")
    strict_api: bool = Field(False, description="HTTP: refuse unknown request fields instead of ignoring them")

    @model_validator(mode="after")
    def _check(self) -> FrontendConfig:
        if self.max_prompt_bytes >= self.max_message_bytes:
            raise ValueError("max_prompt_bytes must be smaller than max_message_bytes")
        if self.auth_token is not None and self.auth_token_path is not None:
            raise ValueError("give auth_token or auth_token_path, not both")
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("auth_token is empty; omit it to turn auth off")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("give both tls_cert_path and tls_key_path, or neither")
        return self

    def resolve_token(self) -> str | None:
        """The bearer token, read from auth_token_path when given; None when auth is off."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value().strip()
        if self.auth_token_path is None:
            return None
        token = self.auth_token_path.expanduser().read_text().strip()
        if not token:
            raise ValueError(f"auth_token_path {self.auth_token_path} is empty; write a token into it")
        return token


@runtime_checkable
class Backend(Protocol):
    """One gating actor (or an in-process engine) as the front end sees it.

    The front end may hold several backends; it sends each request to the least-loaded one serving its
    model. All methods are called from the front end's event loop.
    """

    model_name: str
    max_context: int  # prompt + generated tokens at most
    vocab_size: int

    def tokenize(self, text: str) -> list[int]:
        """Prompt text -> ids. May be called from a worker thread (long prompts are tokenized off the loop)."""
        ...

    def detokenize(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens (EOS) left out; U+FFFD for an incomplete UTF-8 tail."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepDelta]:
        """Stream the request's new tokens; the last delta has finish_reason set. request_id is unique among
        requests in flight. Raises RequestError for a request the engine rejects, CapacityError when full,
        BackendUnavailableError when the engine cannot be reached (the front end then tries another)."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Stop the request and free its blocks; a no-op for an unknown or finished request."""
        ...

    async def status(self) -> dict[str, Any]:
        """{"table_version": int, "actors": [{"name", "kind", "node", "device", "health", "load", ...}], ...}"""
        ...

    async def admin(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """op in "scale" (group, replicas), "drain" (actor), "rebalance", "metrics".

        Returns {"message": str, "table_version": int, ...}; "metrics" returns {"metrics": [{"name", "value",
        "labels"}]}. Raises RequestError for a bad argument, NotImplementedError for an op not built yet.
        """
        ...

    def load(self) -> int:
        """Requests in flight on this backend."""
        ...


class TextStream:
    """Turns a request's generated ids into text deltas.

    Each push decodes the whole id list and emits the new suffix, so a multi-byte character split across
    tokens is never split across deltas: a trailing U+FFFD (an incomplete byte sequence) is held back until
    more ids complete it. Stop strings are cut: text that might be the start of one is held back, and once
    one appears the text ends before it and `stopped` is set.
    """

    def __init__(self, detokenize, stop: Sequence[str] = ()) -> None:
        self._detokenize = detokenize
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = ""
        self._num_emitted_chars = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All the text emitted so far."""
        return self._emitted

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the text that is now safe to emit."""
        assert not self.stopped, "push after a stop string"
        self._ids.extend(ids)
        text = self._detokenize(self._ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, cut)
        end = len(text)
        while end > self._num_emitted_chars and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._stop_prefix_len(text[:end])
        return self._emit(text, end)

    def flush(self) -> str:
        """At the end of the request: everything not emitted yet, held-back text included."""
        if self.stopped:
            return ""
        text = self._detokenize(self._ids)
        return self._emit(text, len(text))

    def _emit(self, text: str, end: int) -> str:
        start = self._num_emitted_chars
        if end <= start:
            return ""
        self._emitted = text[:end]
        self._num_emitted_chars = end
        return text[start:end]

    def _find_stop(self, text: str) -> int | None:
        # Only text not yet emitted can hold a new stop string; look back far enough to catch one that
        # straddles the emitted boundary.
        longest = max((len(s) for s in self._stop), default=0)
        lo = max(0, self._num_emitted_chars - longest + 1)
        hits = [i for i in (text.find(s, lo) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
