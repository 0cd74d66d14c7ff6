"""The OpenAI request bodies (OpenAI's names, vLLM's extensions), and their errors in OpenAI's shape.

Unknown fields are accepted and ignored, as vLLM does (the app logs them and lists them in the
`x-moeray-ignored-fields` response header), unless the server runs with `--strict-api`. Values are checked
strictly: a string where a number belongs is a 400 naming the field, never a silent conversion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeray.common.errors import (
    BackendUnavailableError,
    CapacityError,
    ExpertUnavailableError,
    RequestError,
)
from moeray.common.sampling import MAX_TOP_LOGPROBS

MAX_N = 16  # parallel samples of one prompt
RETRY_AFTER_S = 1  # the Retry-After of a 429 (server busy) or 503 (backend failing over)


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s  # 429 / 503: when to try again (the Retry-After header)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:  # OpenAI's SDKs (and most HTTP clients) wait this long before a retry
            headers["Retry-After"] = str(self.retry_after_s)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def invalid(param: str | None, message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def api_error_for(error: BaseException, field2param: Callable[[str], str] = lambda f: f) -> APIError:
    """The one place errors become HTTP status codes (the HTTP twin of the gRPC servicers' status_for)."""
    import logging

    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestError):  # messages start with the field's name: say it as the caller did
        message = str(error)
        head, sep, rest = message.partition(":")
        fields = getattr(error, "fields", None) or ([head] if head.isidentifier() else [])
        if not fields:
            first = message.split(" ", 1)[0]  # SamplingParams says "<field> must be ..."
            if first.isidentifier() and " must " in message:
                return invalid(field2param(first), f"{field2param(first)}{message[len(first):]}")
            return invalid(None, message)
        param = field2param(fields[0])
        return invalid(param, f"{param}{sep}{rest}" if head == fields[0] else message)
    if isinstance(error, CapacityError):  # in-flight bound: a slot frees when any request finishes
        return APIError(429, str(error), "rate_limit_error", code="server_busy", retry_after_s=RETRY_AFTER_S)
    if isinstance(error, BackendUnavailableError | ExpertUnavailableError):  # failover: back within seconds
        return APIError(503, str(error), "service_unavailable", code="backend_unavailable",
                        retry_after_s=RETRY_AFTER_S)
    if isinstance(error, NotImplementedError):
        return APIError(501, str(error) or "not implemented", "not_implemented")
    logging.getLogger(__name__).exception("internal error", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", "server_error", code="internal_error")


def pydantic_to_api_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """The first problem names `param` (OpenAI has one); the message lists them all. The alternatives of a
    union (stop: str | list[str]) are said once: "stop: expected str or list[str]"."""
    problems: dict[str, str] = {}
    alternatives: dict[str, list[str]] = {}
    for item in errors:
        loc = [p for p in item["loc"] if p != "body"] if item["loc"][:1] == ("body",) else list(item["loc"])
        tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and _is_union_tag(p)), None)
        where = _dotted(loc if tag is None else loc[:tag])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        if item["type"] in ("json_invalid", "model_attributes_type", "dict_type", "model_type") and not where:
            where, message = "body", "expected a JSON object" if item["type"] != "json_invalid" else "not valid JSON"
        if not loc and ": " in message:  # a model-level check; its message starts with the field name
            where, _, message = message.partition(": ")
        if tag is not None:
            names = alternatives.setdefault(where, [])
            if loc[tag] not in names:
                names.append(loc[tag])
            message = "expected " + " or ".join(names)
        problems[where or "body"] = message
    param = next(iter(problems), None)
    return invalid(None if param == "body" else param, "; ".join(f"{w}: {m}" for w, m in problems.items()))


def validation_error(error: ValidationError) -> APIError:
    return pydantic_to_api_error(error.errors(include_url=False))


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or "[" in part


def _dotted(loc: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


# ---------------------------------------------------------------------------------------------------------
# Request bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one of json (a schema), regex, choice, grammar."""

    model_config = ConfigDict(extra="allow", strict=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def spec(self) -> dict[str, str] | None:
        given = {k: v for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar)) if v is not None}
        if len(given) > 1:
            raise ValueError(f"give one of json, regex, choice, grammar; got {', '.join(given)}")
        if not given:
            return None
        kind, value = next(iter(given.items()))
        return {"kind": kind, "value": value if isinstance(value, str) else json.dumps(value)}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None

    def spec(self) -> dict[str, str] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"kind": "json", "value": json.dumps({"type": "object"})}
        if not self.json_schema or not isinstance(self.json_schema.get("schema", {}), dict):
            raise ValueError("json_schema: give {'name': ..., 'schema': {...}}")
        return {"kind": "json", "value": json.dumps(self.json_schema.get("schema") or {"type": "object"})}


class SamplingBody(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, populate_by_name=True)

    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # per prompt token: k alternatives
    cache_salt: str | None = Field(None, min_length=1, max_length=256)  # reuse only this salt's cached prefixes

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value} for {key}")
        return bias

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def structured(self) -> tuple[str, dict[str, str]] | None:
        """(the field that asked, {"kind", "value"}) when the output is constrained."""
        for name, part in (("structured_outputs", self.structured_outputs), ("response_format", self.response_format)):
            if part is None:
                continue
            try:
                spec = part.spec()
            except ValueError as e:
                raise invalid(name, f"{name}: {e}") from None
            if spec is not None:
                return name, spec
        return None

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request, got a batch of {len(prompt)}; send them separately")
            return prompt[0]
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_at_least_n(cls, best_of: int | None, info) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and not n <= best_of <= MAX_N:
            raise ValueError(f"must be in [n={n}, {MAX_N}], got {best_of}")
        if best_of is not None and best_of > n and info.data.get("stream"):
            raise ValueError("best_of > n cannot stream (the best are known at the end); use stream: false")
        return best_of

    def num_samples(self) -> int:
        """Requests to run: best_of (the n best by cumulative logprob are returned) or n."""
        return self.best_of or self.n

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported; omit it")
        return suffix


class ChatMessage(BaseModel):
    """Extra keys (name, tool_call_id, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string; list content may hold text parts only."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("tool calling is not supported; omit tools")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported; omit tool_choice")
        return choice

    def max_tokens_param(self) -> tuple[str, int | None]:
        """Which of max_completion_tokens (OpenAI's current name) and max_tokens was given, and its value."""
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise invalid("max_completion_tokens", "max_completion_tokens: disagrees with max_tokens; give one")
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = ""
    tokens: list[int]
