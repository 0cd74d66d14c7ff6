"""The serving API's request schema: validation of a generation request at the edge (gRPC and HTTP alike).

A front end turns a wire request into a dict and validates it here with `parse_generate_request`; every
rejection is a `RequestValidationError` whose message starts with the offending field's name. The front ends
themselves (their config, the Backend contract, text streaming) live in actors/frontend_*.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moeray.common.errors import RequestError
from moeray.common.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_PROMPT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request used, sent with its last answer (gRPC's Usage message, the client's `Usage`)."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache instead of being computed


_DEFAULT = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.default is not dataclasses.MISSING}


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
    # sampling fields default to the engine's defaults (SamplingParams), stated once there
    max_tokens: int = _DEFAULT["max_tokens"]
    temperature: float = _DEFAULT["temperature"]
    top_p: float = _DEFAULT["top_p"]
    top_k: int = _DEFAULT["top_k"]
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = ""
    min_p: float = _DEFAULT["min_p"]
    presence_penalty: float = _DEFAULT["presence_penalty"]
    frequency_penalty: float = _DEFAULT["frequency_penalty"]
    repetition_penalty: float = _DEFAULT["repetition_penalty"]
    min_tokens: int = _DEFAULT["min_tokens"]
    logit_bias: dict[int, float] = Field(default_factory=dict)
    top_logprobs: int = 0
    structured: dict[str, str] | None = None  # {"kind": "json" | "regex" | "choice" | "grammar", "value": ...}
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    skip_special_tokens: bool = True  # False: special tokens (EOS, ...) are detokenized into the text
    prompt_logprobs: int | None = None  # per prompt token: its logprob, rank and this many alternatives
    cache_salt: str | None = None  # vLLM's: reuse only cached prefixes of requests with the same salt

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
        prompt_logprobs=request.prompt_logprobs,
        cache_salt=request.cache_salt,
    )
