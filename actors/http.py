"""The OpenAI-compatible HTTP API: Starlette routes, served by uvicorn, over the gRPC front end's `Frontend`.

    GET  /v1/models              the served models
    POST /v1/completions         text or token-id prompt; `stream: true` answers Server-Sent Events
    POST /v1/chat/completions    messages rendered with the model's chat template (see `ChatTemplate`)
    GET  /health                 200 while serving, 503 while stopping; needs no token

A request's life here: auth (bearer token, 401) -> the OpenAI body, checked by pydantic (400 naming the field in
`param`) -> model (404) -> the same `parse_generate_request` and the same `Frontend.generate` as gRPC, so
validation, the in-flight bound (429), tokenization, backend failover (503) and cancellation are shared. Each
request's stream is pumped by its own task; when the client goes away that task is cancelled once, and the
front end cancels the request in the backend, which frees its blocks. Errors become HTTP answers in one place,
`api_error_for`.

Beyond OpenAI's fields, requests may carry vLLM's extensions `top_k`, `ignore_eos` and `stop_token_ids`.
Not supported (400 naming the field): `n` > 1, `best_of` > 1, `echo`, `suffix`, penalties, `logit_bias`,
tools, and log-probabilities of alternative tokens (`logprobs` > 0 on completions, `top_logprobs` > 0 on
chat): the engine reports the sampled token's log-probability only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moeray.actors.frontend import LONG_PROMPT_CHARS, Frontend
from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.api import (
    Backend,
    FrontendConfig,
    GenerateRequest,
    RequestValidationError,
    parse_generate_request,
)
from moeray.common.errors import (
    BackendUnavailableError,
    CapacityError,
    ExpertUnavailableError,
    RequestError,
)

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


# ---------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(param: str | None, message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def api_error_for(error: BaseException, field2param: Callable[[str], str] = lambda f: f) -> APIError:
    """The one place errors become HTTP status codes (the HTTP twin of frontend.status_for)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestError):  # messages start with the field's name: say it as the caller did
        message = str(error)
        head, sep, rest = message.partition(":")
        fields = getattr(error, "fields", None) or ([head] if head.isidentifier() else [])
        if not fields:
            return invalid(None, message)
        param = field2param(fields[0])
        return invalid(param, f"{param}{sep}{rest}" if head == fields[0] else message)
    if isinstance(error, CapacityError):
        return APIError(429, str(error), "rate_limit_error", code="server_busy")
    if isinstance(error, BackendUnavailableError | ExpertUnavailableError):
        return APIError(503, str(error), "service_unavailable", code="backend_unavailable")
    if isinstance(error, NotImplementedError):
        return APIError(501, str(error) or "not implemented", "not_implemented")
    logger.exception("internal error", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", "server_error", code="internal_error")


def _pydantic_to_api_error(error: ValidationError) -> APIError:
    """The first problem names `param` (OpenAI has one); the message lists them all. The alternatives of a
    union (stop: str | list[str]) are said once: "stop: expected str or list[str]"."""
    problems: dict[str, str] = {}
    alternatives: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and _is_union_tag(p)), None)
        where = _dotted(loc if tag is None else loc[:tag])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        if not loc:  # a model-level check; its message starts with the field name
            where, _, message = message.partition(": ")
        if tag is not None:
            names = alternatives.setdefault(where, [])
            if loc[tag] not in names:
                names.append(loc[tag])
            message = "expected " + " or ".join(names)
        problems[where] = message
    return invalid(next(iter(problems), None), "; ".join(f"{w}: {m}" for w, m in problems.items()))


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or "[" in part


def _dotted(loc: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


# ---------------------------------------------------------------------------------------------------------
# Request bodies (OpenAI's names)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _SamplingBody(BaseModel):
    """Fields both endpoints share. Unknown fields are rejected, naming them, rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}; send n separate requests (with different seeds)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported; omit it")
        return bias

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return options

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
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

    @field_validator("logprobs")
    @classmethod
    def _sampled_only(cls, logprobs: int | None) -> int | None:
        if logprobs is not None and logprobs != 0:
            raise ValueError("only the sampled token's log-probability is available; use logprobs=0")
        return logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported; the prompt is yours already")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"only best_of=1 is supported, got {best_of}")
        return best_of

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


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _sampled_only(cls, top_logprobs: int | None) -> int | None:
        if top_logprobs:
            raise ValueError("only the sampled token's log-probability is available; use logprobs: true alone")
        return top_logprobs

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

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValueError(f"only type 'text' is supported, got {fmt.get('type')!r}")
        return fmt

    def max_tokens_param(self) -> tuple[str, int | None]:
        """Which of max_completion_tokens (OpenAI's current name) and max_tokens was given, and its value."""
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise invalid("max_completion_tokens", "max_completion_tokens: disagrees with max_tokens; give one")
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


# ---------------------------------------------------------------------------------------------------------
# Chat template


class ChatTemplate:
    """The model's chat template, rendered as transformers does (sandboxed jinja2), or the plain default.

    The template comes from `chat_template.jinja` in the model folder or the `chat_template` key of its
    `tokenizer_config.json`. Without one, the default renders one "<role>: <content>" line per message and
    ends with "assistant: ", which suits base models trained on plain text.
    """

    def __init__(self, source: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = special_tokens or {}
        self._template = _compile(source) if source else None

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> ChatTemplate:
        if path is None:
            return cls()
        folder = Path(path)
        config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((folder / "tokenizer_config.json").read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            source = jinja_file.read_text()
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        return cls(source if isinstance(source, str) and source.strip() else None, special)

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """messages (role, content as a string, any extra keys) -> the prompt text, ending where the reply starts."""
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self._template.render(messages=list(messages), add_generation_prompt=True, **self.special_tokens)


def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def model_dir(backend: Backend) -> str | None:
    """Where a backend's model lives, when it says (DeploymentBackend knows its deployment's config)."""
    path = getattr(backend, "model_path", None)
    if path is None:
        path = getattr(getattr(getattr(backend, "dep", None), "config", None), "model", None)
    return str(path) if path else None


# ---------------------------------------------------------------------------------------------------------
# One request's stream


_END = object()


class RequestRun:
    """Pumps `Frontend.generate` in a task of its own, so that a client going away cancels it exactly once
    (Starlette cancels the response repeatedly, which would cut the front end's clean-up short)."""

    def __init__(self, frontend: Frontend, request: GenerateRequest, tasks: set[asyncio.Task]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(frontend.generate(request)))
        tasks.add(self._task)  # the loop holds tasks weakly
        self._task.add_done_callback(tasks.discard)

    async def _pump(self, stream: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async with aclosing(stream) as responses:
                async for response in responses:
                    self._queue.put_nowait(response)
            self._queue.put_nowait(_END)
        except Exception as e:  # handed to the reader, which turns it into an HTTP error
            self._queue.put_nowait(e)

    async def next(self) -> pb.GenerateResponse | None:
        """The next step's message, None after the last; raises what the front end raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, run: RequestRun, step):
    """Await `step` (a coroutine reading `run`), cancelling the run if the client goes away first."""
    work = asyncio.ensure_future(step)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        run.cancel()
        raise APIError(499, "client closed the request", "client_closed_request")
    return work.result()


# ---------------------------------------------------------------------------------------------------------
# Answers


FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


@dataclass(slots=True)
class Output:
    """What a request produced so far, gathered from its step messages."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend(response.logprobs)
        if response.finish_reason:
            self.finish_reason = FINISH_REASONS.get(response.finish_reason, response.finish_reason)
        if response.HasField("usage"):
            self.prompt_tokens = response.usage.prompt_tokens
            self.completion_tokens = response.usage.completion_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class Call:
    """One validated OpenAI call: what to run and how to shape the answer."""

    kind: Literal["completion", "chat"]
    id: str
    model: str
    created: int
    request: GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: bool
    token_text: Callable[[int], str]

    def envelope(self, chunk: bool) -> dict[str, Any]:
        obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
        return {"id": self.id, "object": obj[self.kind], "created": self.created, "model": self.model}

    def logprobs_of(self, token_ids: Sequence[int], logprobs: Sequence[float], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        if self.kind == "chat":
            content = [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                       for s, lp in zip(tokens, logprobs)]
            return {"content": content}
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def choice(self, text: str, token_ids, logprobs, finish_reason: str | None, chunk: bool, offset: int = 0) -> dict:
        out: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            out["text"] = text
        elif chunk:
            out["delta"] = {"content": text} if text else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = self.logprobs_of(token_ids, logprobs, offset)
        out["finish_reason"] = finish_reason
        return out

    def whole(self, output: Output) -> dict[str, Any]:
        choice = self.choice(output.text, output.token_ids, output.logprobs, output.finish_reason, chunk=False)
        return {**self.envelope(chunk=False), "choices": [choice], "usage": output.usage()}

    async def chunks(self, run: RequestRun, first: pb.GenerateResponse) -> AsyncIterator[str]:
        """The SSE body: one chunk per engine step, then usage (if asked for), then [DONE]."""
        output, response = Output(), first
        try:
            if self.kind == "chat":
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
                yield sse({**self.envelope(chunk=True), "choices": [role], **self._usage_slot()})
            while response is not None:
                offset = len(output.text)
                output.add(response)
                finish = FINISH_REASONS.get(response.finish_reason, response.finish_reason) or None
                choice = self.choice(response.text, response.token_ids, response.logprobs, finish, True, offset)
                yield sse({**self.envelope(chunk=True), "choices": [choice], **self._usage_slot()})
                response = await run.next()
            if self.include_usage:
                yield sse({**self.envelope(chunk=True), "choices": [], "usage": output.usage()})
        except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
            yield sse(api_error_for(e).body())
        finally:
            run.cancel()
        yield sse("[DONE]")

    def _usage_slot(self) -> dict[str, Any]:
        return {"usage": None} if self.include_usage else {}


# ---------------------------------------------------------------------------------------------------------
# The application


class OpenAIApp:
    """The routes' state: the shared front end, the bearer token, each model's chat template."""

    def __init__(self, frontend: Frontend, token: str | None, templates: dict[str, ChatTemplate]) -> None:
        self.frontend, self.templates = frontend, templates
        self._expected = f"Bearer {token}".encode() if token else None
        self.created = int(time.time())
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()

    def starlette(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self._guarded(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._guarded(self.get_model), methods=["GET"]),
            Route("/v1/completions", self._guarded(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guarded(self.chat_completions), methods=["POST"]),
        ]
        handlers = {HTTPException: _http_exception}
        return Starlette(routes=routes, exception_handlers=handlers)

    def _guarded(self, handler):
        """Auth first, then the handler; any error becomes an OpenAI-shaped answer."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except Exception as e:
                return api_error_for(e).response()

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise APIError(401, "missing or wrong bearer token; send `Authorization: Bearer <token>` "
                           "(the openai client's api_key)", "invalid_request_error", code="invalid_api_key")

    # ---- routes ------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def _model_card(self, name: str) -> dict[str, Any]:
        spec = self.frontend.models[name]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moeray",
                "max_model_len": spec.max_context}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.frontend.models]})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self._model_card(self._resolve_model(request.path_params["model"])))

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionBody)
        model = self._resolve_model(body.model)
        prompt_field = "prompt_token_ids" if isinstance(body.prompt, list) else "prompt"
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        fields = self._generate_fields(body, model, max_tokens)
        fields[prompt_field] = body.prompt
        fields["logprobs"] = body.logprobs is not None
        param = _field2param({"prompt_token_ids": "prompt"})
        call = self._call("completion", "cmpl", model, fields, body, param)
        return await self._answer(request, call, param)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionBody)
        model = self._resolve_model(body.model)
        max_name, max_tokens = body.max_tokens_param()
        prompt_ids = await self._chat_prompt_ids(body, model)
        if max_tokens is None:  # OpenAI's default: as much as the context leaves
            max_tokens = max(1, self.frontend.models[model].max_context - len(prompt_ids))
        fields = {**self._generate_fields(body, model, max_tokens), "prompt_token_ids": prompt_ids,
                  "logprobs": body.logprobs}
        param = _field2param({"prompt": "messages", "prompt_token_ids": "messages", "max_tokens": max_name})
        call = self._call("chat", "chatcmpl", model, fields, body, param)
        return await self._answer(request, call, param)

    # ---- steps ---------------------------------------------------------------------------------------------
    async def _parse(self, request: Request, schema: type[BaseModel]):
        raw = await _read_body(request, self.frontend.config.max_message_bytes)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise invalid(None, f"body: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise invalid(None, "body: expected a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _pydantic_to_api_error(e) from None

    def _resolve_model(self, name: str) -> str:
        models = self.frontend.models
        if not name and len(models) == 1:
            return next(iter(models))
        if name in models:
            return name
        served = ", ".join(sorted(models))
        if not name:
            raise invalid("model", f"model: required when several models are served; served: {served}")
        raise APIError(404, f"model: the model {name!r} does not exist; served: {served}", "invalid_request_error",
                       "model", "model_not_found")

    @staticmethod
    def _generate_fields(body: _SamplingBody, model: str, max_tokens: int) -> dict[str, Any]:
        fields = {"model": model, "max_tokens": max_tokens, "stop": body.stop_list(), "ignore_eos": body.ignore_eos,
                  "stop_token_ids": list(body.stop_token_ids or [])}
        optional = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed}
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    async def _chat_prompt_ids(self, body: ChatCompletionBody, model: str) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            try:
                messages.append({**(m.model_extra or {}), "role": m.role, "content": m.text()})
            except ValueError as e:
                raise invalid(f"messages[{i}].content", f"messages[{i}].content: {e}") from None
        try:
            text = self.templates[model].render(messages)
        except Exception as e:  # a template's raise_exception, or a broken template
            raise invalid("messages", f"messages: the chat template refused them: {e}") from None
        limit = self.frontend.config.max_prompt_bytes
        if len(text.encode()) > limit:
            raise invalid("messages", f"messages: the rendered prompt is longer than {limit} bytes; send less")
        backend = self.frontend.model2backends[model][0]
        try:
            if len(text) > LONG_PROMPT_CHARS:
                return await asyncio.to_thread(backend.tokenize, text)
            return backend.tokenize(text)
        except RequestError as e:
            raise invalid("messages", str(e)) from None

    def _call(self, kind, id_prefix: str, model: str, fields: dict, body: _SamplingBody, param) -> Call:
        call_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            request = parse_generate_request({**fields, "request_id": call_id}, self.frontend.models,
                                             max_prompt_bytes=self.frontend.config.max_prompt_bytes)
        except RequestValidationError as e:
            raise api_error_for(e, param) from None
        backend = self.frontend.model2backends[model][0]
        return Call(kind, call_id, model, int(time.time()), request, body.stream, body.include_usage(),
                    bool(fields["logprobs"]), lambda t: backend.detokenize([t]))

    async def _answer(self, request: Request, call: Call, param) -> Response:
        run = RequestRun(self.frontend, call.request, self.tasks)
        try:
            if call.stream:  # the first step decides the status code: errors before it are HTTP errors
                first = await _unless_disconnected(request, run, run.next())
                if first is None:
                    raise BackendUnavailableError("the stream ended before its first message")
                return StreamingResponse(call.chunks(run, first), media_type="text/event-stream", headers=SSE_HEADERS)
            output = await _unless_disconnected(request, run, _collect(run))
            return JSONResponse(call.whole(output))
        except Exception as e:
            run.cancel()
            raise api_error_for(e, param) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes, before it is all read."""
    too_big = APIError(413, f"body: larger than {limit} bytes; send a shorter prompt", "invalid_request_error")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(run: RequestRun) -> Output:
    output = Output()
    while (response := await run.next()) is not None:
        output.add(response)
    return output


def _field2param(renames: dict[str, str]) -> Callable[[str], str]:
    return lambda name: renames.get(name, name)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()


# ---------------------------------------------------------------------------------------------------------
# Server


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the caller (moeray serve) owns SIGINT and SIGTERM and stops us itself


class HTTPServer:
    """A started HTTP API. `stop(grace)` turns /health to 503, stops accepting, lets requests finish."""

    def __init__(self, server: _Server, task: asyncio.Task, app: OpenAIApp) -> None:
        self.uvicorn_server, self._task, self.app = server, task, app

    @property
    def frontend(self) -> Frontend:
        return self.app.frontend

    async def stop(self, grace: float | None = None) -> None:
        grace = self.app.frontend.config.grace_s if grace is None else grace
        self.app.stopping = True
        # uvicorn needs a moment to close idle keep-alive connections even when nothing is in flight
        self.uvicorn_server.config.timeout_graceful_shutdown = max(grace, 0.2)
        self.uvicorn_server.should_exit = True
        await self._task
        for task in list(self.app.tasks):
            task.cancel()


def _listen(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None


async def serve_http(
    backends: Sequence[Backend],
    host: str = "127.0.0.1",
    port: int = 0,
    config: FrontendConfig | None = None,
    *,
    frontend: Frontend | None = None,
) -> tuple[HTTPServer, int]:
    """Start the HTTP API over `backends` on the running loop; port 0 picks a free port.

    Pass the gRPC server's `frontend` to share its in-flight bound and request ids; otherwise one is made
    from `config`. Auth (the bearer token) and TLS (cert and key) come from `config`. Returns (server, port).
    """
    config = frontend.config if frontend is not None else (config or FrontendConfig())
    token = config.resolve_token()
    if frontend is None:
        tls = config.tls_cert_path is not None
        frontend = Frontend(list(backends), config, auth_required=token is not None, tls=tls)
    templates = {}
    for name, model_backends in frontend.model2backends.items():
        templates[name] = ChatTemplate.from_model_dir(model_dir(model_backends[0]))
    app = OpenAIApp(frontend, token, templates)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    ssl = {}
    if config.tls_cert_path is not None:
        ssl = {"ssl_certfile": str(config.tls_cert_path.expanduser()),
               "ssl_keyfile": str(config.tls_key_path.expanduser())}
    uv_config = uvicorn.Config(app.starlette(), lifespan="off", log_level="warning", access_log=False,
                               timeout_graceful_shutdown=config.grace_s, **ssl)
    server = _Server(uv_config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises why it failed
            raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
        await asyncio.sleep(0.01)
    logger.info("moeray HTTP API on %s:%d (auth %s, tls %s)", host, bound, bool(token), bool(ssl))
    return HTTPServer(server, task, app), bound
