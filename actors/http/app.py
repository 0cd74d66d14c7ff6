"""The routes: FastAPI (OpenAPI at /openapi.json) over the gRPC front end's `Frontend`.

A request's life here: body size (413) -> auth (bearer token, 401) -> the OpenAI body, checked by pydantic (400
naming the field in `param`; unknown fields ignored and listed in `x-moeray-ignored-fields`, or refused with
--strict-api) -> model (404) -> one front-end request per choice (n > 1 fans out here, distinct seeds, so the
choices share the prompt's prefix blocks in the cache) -> the same `Frontend.generate` as gRPC, so validation,
the in-flight bound (429), tokenization, failover (503) and cancellation are shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
import uuid
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import moeray
from moeray.actors.frontend import LONG_PROMPT_CHARS, Frontend
from moeray.actors.frontend_core import detokenizer
from moeray.actors.http.answers import Call
from moeray.actors.http.chat import ChatTemplate
from moeray.actors.http.metrics import CONTENT_TYPE, HTTPMetrics
from moeray.actors.http.schemas import (
    APIError,
    ChatCompletionBody,
    CompletionBody,
    DetokenizeBody,
    SamplingBody,
    TokenizeBody,
    api_error_for,
    invalid,
    pydantic_to_api_error,
)
from moeray.actors.http.stream import SSE_HEADERS, Runs, collect, unless_disconnected
from moeray.common.api import RequestValidationError, parse_generate_request
from moeray.common.errors import BackendUnavailableError, RequestError
from moeray.engine.structured import check_grammar

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
IGNORED_HEADER = "x-moeray-ignored-fields"


class OpenAIApp:
    """The routes' state: the shared front end, the bearer token, each model's chat template, the metrics."""

    def __init__(self, frontend: Frontend, token: str | None, templates: dict[str, ChatTemplate],
                 strict: bool = False) -> None:
        self.frontend, self.templates, self.strict = frontend, templates, strict
        self._expected = f"Bearer {token}".encode() if token else None
        self.created = int(time.time())
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()
        self.metrics = HTTPMetrics()
        digest = hashlib.sha1(f"{moeray.__version__}:{sorted(frontend.models)}".encode()).hexdigest()
        self.fingerprint = f"fp_{digest[:10]}"

    def fastapi(self) -> FastAPI:
        app = FastAPI(title="moeray", version=moeray.__version__, docs_url=None, redoc_url=None,
                      description="OpenAI-compatible API of a moeray deployment")
        auth = [Depends(self._authorize)]
        app.get("/health")(self.health)
        app.get("/version")(self.version)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models", dependencies=auth)(self.list_models)
        app.get("/v1/models/{model:path}", dependencies=auth)(self.get_model)
        app.post("/v1/completions", dependencies=auth)(self.completions)
        app.post("/v1/chat/completions", dependencies=auth)(self.chat_completions)
        app.post("/tokenize", dependencies=auth)(self.tokenize)
        app.post("/detokenize", dependencies=auth)(self.detokenize)
        app.add_exception_handler(APIError, _api_error)
        app.add_exception_handler(FastAPIValidationError, _validation_error)
        app.add_exception_handler(HTTPException, _http_exception)
        app.add_exception_handler(Exception, _internal_error)
        return app

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise APIError(401, "missing or wrong bearer token; send `Authorization: Bearer <token>` "
                           "(the openai client's api_key)", "invalid_request_error", code="invalid_api_key")

    # ---- plain routes ------------------------------------------------------------------------------------
    async def health(self) -> Response:
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def version(self) -> dict[str, str]:
        return {"version": moeray.__version__}

    async def prometheus(self) -> Response:
        try:
            backend = (await self.frontend.first_answer(lambda b: b.admin("metrics"))).get("metrics", [])
        except (BackendUnavailableError, NotImplementedError) as e:
            logger.warning("backend metrics unavailable: %s", e)
            backend = []
        return Response(self.metrics.render(backend), media_type=CONTENT_TYPE)

    def _model_card(self, name: str) -> dict[str, Any]:
        spec = self.frontend.models[name]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moeray",
                "max_model_len": spec.max_context}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card(n) for n in self.frontend.models]}

    async def get_model(self, model: str) -> dict[str, Any]:
        return self._model_card(self._resolve_model(model))

    async def tokenize(self, body: TokenizeBody) -> dict[str, Any]:
        model = self._resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("prompt", "prompt: give either prompt or messages")
        if body.messages is not None:
            ids = await self._chat_prompt_ids(body.messages, model)
        else:
            ids = await self._tokenize(model, body.prompt, "prompt")
        return {"count": len(ids), "max_model_len": self.frontend.models[model].max_context, "tokens": ids,
                "token_strs": None}

    async def detokenize(self, body: DetokenizeBody) -> dict[str, Any]:
        model = self._resolve_model(body.model)
        vocab = self.frontend.models[model].vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid("tokens", f"tokens: ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return {"prompt": self.frontend.model2backends[model][0].detokenize(list(body.tokens))}

    # ---- generation --------------------------------------------------------------------------------------
    async def completions(self, request: Request, body: CompletionBody) -> Response:
        arrival_s = time.monotonic()
        model = self._resolve_model(body.model)
        prompt_field = "prompt_token_ids" if isinstance(body.prompt, list) else "prompt"
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        best_of = body.num_samples() > body.n  # the ranking needs every sample's logprobs
        fields = {**self._generate_fields(body, model, max_tokens), prompt_field: body.prompt,
                  "logprobs": body.logprobs is not None or best_of, "top_logprobs": body.logprobs or 0}
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else self._detokenize(model, body.prompt)
        echo_logprobs = body.echo and body.logprobs is not None  # vLLM: the prompt tokens' logprobs lead
        if echo_logprobs:
            fields["prompt_logprobs"] = max(body.prompt_logprobs or 0, body.logprobs)
        if fields.get("prompt_logprobs") is not None and isinstance(body.prompt, str):  # ids to name the tokens
            fields.pop("prompt")
            fields["prompt_token_ids"] = await self._tokenize(model, body.prompt, "prompt")
        param = _field2param({"prompt_token_ids": "prompt", "top_logprobs": "logprobs"})
        call = self._call("completion", "cmpl", model, fields, body, param, body.logprobs or 0, echo)
        call.echo_logprobs = echo_logprobs
        call.logprobs, call.best_of = body.logprobs is not None, body.n if best_of else 0
        return await self._answer(request, call, body, param, arrival_s)

    async def chat_completions(self, request: Request, body: ChatCompletionBody) -> Response:
        arrival_s = time.monotonic()
        model = self._resolve_model(body.model)
        max_name, max_tokens = body.max_tokens_param()
        prompt_ids = await self._chat_prompt_ids(body.messages, model)
        if max_tokens is None:  # OpenAI's default: as much as the context leaves
            max_tokens = max(1, self.frontend.models[model].max_context - len(prompt_ids))
        fields = {**self._generate_fields(body, model, max_tokens), "prompt_token_ids": prompt_ids,
                  "logprobs": body.logprobs, "top_logprobs": body.top_logprobs or 0}
        param = _field2param({"prompt": "messages", "prompt_token_ids": "messages", "max_tokens": max_name})
        call = self._call("chat", "chatcmpl", model, fields, body, param, body.top_logprobs or 0)
        return await self._answer(request, call, body, param, arrival_s)

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
    def _generate_fields(body: SamplingBody, model: str, max_tokens: int) -> dict[str, Any]:
        fields = {"model": model, "max_tokens": max_tokens, "stop": body.stop_list(), "ignore_eos": body.ignore_eos,
                  "stop_token_ids": list(body.stop_token_ids or []), "min_p": body.min_p,
                  "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                  "repetition_penalty": body.repetition_penalty, "min_tokens": body.min_tokens,
                  "logit_bias": {int(k): float(v) for k, v in (body.logit_bias or {}).items()},
                  "include_stop_str_in_output": body.include_stop_str_in_output,
                  "skip_special_tokens": body.skip_special_tokens, "prompt_logprobs": body.prompt_logprobs,
                  "cache_salt": body.cache_salt}
        top_k = None if body.top_k is None else max(body.top_k, 0)
        optional = {"temperature": body.temperature, "top_p": body.top_p, "top_k": top_k, "seed": body.seed}
        fields.update({k: v for k, v in optional.items() if v is not None})
        structured = body.structured()
        if structured is not None:
            name, spec = structured
            try:
                check_grammar(spec)
            except RequestError as e:
                raise invalid(name, f"{name}{str(e).removeprefix('structured')}") from None
            fields["structured"] = spec
        return fields

    async def _tokenize(self, model: str, text: str, param: str) -> list[int]:
        limit = self.frontend.config.max_prompt_bytes
        if len(text.encode()) > limit:
            raise invalid(param, f"{param}: longer than {limit} bytes; send less")
        backend = self.frontend.model2backends[model][0]
        try:
            if len(text) > LONG_PROMPT_CHARS:
                return await asyncio.to_thread(backend.tokenize, text)
            return backend.tokenize(text)
        except RequestError as e:
            raise invalid(param, f"{param}: {str(e).removeprefix('prompt: ')}") from None

    def _detokenize(self, model: str, ids: list[int]) -> str:
        vocab = self.frontend.models[model].vocab_size
        return self.frontend.model2backends[model][0].detokenize([t for t in ids if 0 <= t < vocab])

    async def _chat_prompt_ids(self, messages, model: str) -> list[int]:
        rendered = []
        for i, m in enumerate(messages):
            try:
                rendered.append({**(m.model_extra or {}), "role": m.role, "content": m.text()})
            except ValueError as e:
                raise invalid(f"messages[{i}].content", f"messages[{i}].content: {e}") from None
        try:
            text = self.templates[model].render(rendered)
        except Exception as e:  # a template's raise_exception, or a broken template
            raise invalid("messages", f"messages: the chat template refused them: {e}") from None
        return await self._tokenize(model, text, "messages")

    def _call(self, kind, id_prefix: str, model: str, fields: dict, body: SamplingBody, param, num_top: int,
              echo: str = "") -> Call:
        call_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            first = parse_generate_request({**fields, "request_id": call_id}, self.frontend.models,
                                           max_prompt_bytes=self.frontend.config.max_prompt_bytes)
        except RequestValidationError as e:
            raise api_error_for(e, param) from None
        requests = [first]
        num = body.num_samples() if isinstance(body, CompletionBody) else body.n
        for i in range(1, num):  # distinct seeds: the n choices differ unless sampling is greedy
            seed = (body.seed + i) % (2**63) if body.seed is not None else random.getrandbits(63)
            requests.append(first.model_copy(update={"request_id": f"{call_id}-{i}", "seed": seed}))
        if num > 1 and body.seed is None:
            requests[0] = first.model_copy(update={"seed": random.getrandbits(63)})
        try:
            detokenize = detokenizer(self.frontend.model2backends[model][0], body.skip_special_tokens)
        except RequestError as e:
            raise api_error_for(e, param) from None
        return Call(kind, call_id, model, int(time.time()), requests, body.stream, body.include_usage(),
                    bool(fields["logprobs"]), num_top, lambda t: detokenize([t]), self.fingerprint, echo,
                    list(first.prompt_token_ids), body.prompt_logprobs)

    def _ignored(self, body: SamplingBody, endpoint: str) -> dict[str, str]:
        ignored = body.ignored_fields()
        if not ignored:
            return {}
        if self.strict:
            raise invalid(ignored[0], f"{ignored[0]}: unknown field (the server runs with --strict-api)")
        logger.info("%s: ignoring unknown fields %s", endpoint, ", ".join(ignored))
        return {IGNORED_HEADER: ",".join(quote(name, safe="") for name in ignored)}  # headers are ASCII

    async def _answer(self, request: Request, call: Call, body: SamplingBody, param, arrival_s: float) -> Response:
        try:
            headers = self._ignored(body, call.kind)
        except APIError:
            self.metrics.finished(call.kind, 400)
            raise
        runs = Runs(self.frontend.generate, call.requests, self.tasks)
        try:
            if call.stream:  # the first step decides the status code: errors before it are HTTP errors
                first = await unless_disconnected(request, runs, runs.next())
                return StreamingResponse(call.chunks(runs, first, self.metrics, arrival_s),
                                         media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
            last_s: list = [None] * len(call.requests)
            observe = lambda piece, i: self.metrics.observe_piece(piece, arrival_s, last_s, i)  # noqa: E731
            outputs = await unless_disconnected(request, runs, collect(runs, len(call.requests), observe))
            self.metrics.finished(call.kind, 200, time.monotonic() - arrival_s)
            return JSONResponse(call.whole(outputs), headers=headers)
        except Exception as e:
            runs.cancel()
            error = api_error_for(e, param)
            self.metrics.finished(call.kind, error.status)
            raise error from None


def _field2param(renames: dict[str, str]):
    return lambda name: renames.get(name, name)


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _validation_error(request: Request, exc: FastAPIValidationError) -> Response:
    return pydantic_to_api_error(exc.errors()).response()


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    return api_error_for(exc).response()
