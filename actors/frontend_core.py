"""The front end's request logic, wire-free: validation, admission, tokenization, backend choice, streaming.

A request's life here: validate (common.api) -> admit (bounded, else CapacityError) -> tokenize (long prompts
off the event loop) -> pick the backend (prefix affinity bounded by load; another one is tried if one is
unavailable before the first token) -> stream step deltas as text deltas (TextStream: stop strings cut, no
split characters) -> on any early exit (client gone, deadline, stop string, shutdown) cancel the request in the
backend so it frees its blocks. The gRPC servicers (frontend_grpc.py) and the HTTP app (http/) both drive this.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moeray.actors.frontend_backend import Backend
from moeray.actors.frontend_config import FrontendConfig
from moeray.actors.text_stream import TextStream
from moeray.common.api import (
    GenerateRequest,
    ModelSpec,
    Usage,
    parse_generate_request,
    to_sampling_params,
    validate_prompt_length,
)
from moeray.common.errors import BackendUnavailableError, CapacityError, DuplicateRequestError, RequestError
from moeray.common.sampling import PromptLogprobs, SamplingParams, StepDelta, TopLogprobs
from moeray.router.affinity import order_by_affinity

logger = logging.getLogger(__name__)

LONG_PROMPT_CHARS = 16384  # tokenize longer prompts off the event loop
CANCEL_TIMEOUT_S = 10.0


@dataclass(slots=True)
class TextDelta:
    """One step of a request as the front ends send it: new text and ids; the last has finish_reason and usage.
    `request_id` is the client's id."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the first delta, when the request asked for them


class Admission:
    """A bounded count of requests in flight; the event loop is single-threaded, so a plain counter."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.num_in_flight = 0

    def try_acquire(self) -> bool:
        if self.num_in_flight >= self.limit:
            return False
        self.num_in_flight += 1
        return True

    def release(self) -> None:
        assert self.num_in_flight > 0
        self.num_in_flight -= 1


def order_by_load(backends: Sequence[Backend], tie_break: int) -> list[Backend]:
    """Least loaded first; equal loads rotate with tie_break so they share the work."""
    n = len(backends)
    return [backends[i] for i in sorted(range(n), key=lambda i: (backends[i].load(), (i - tie_break) % n))]


async def _open_stream(backend: Backend, request_id: str, prompt_ids: list[int], params: SamplingParams):
    stream = backend.generate(request_id, prompt_ids, params)
    if inspect.isawaitable(stream):  # an `async def` returning an iterator rather than an async generator
        stream = await stream
    return stream


async def _cancel_quietly(backend: Backend, request_id: str) -> None:
    # Shielded so a second cancellation of the handler cannot abandon it; bounded so a dead backend cannot hang
    # the handler. The request is over for the client either way.
    try:
        await asyncio.wait_for(asyncio.shield(backend.cancel(request_id)), CANCEL_TIMEOUT_S)
    except Exception:
        logger.exception("cancelling request %s failed", request_id)


async def _close_stream(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing a backend stream failed")


@dataclass
class Frontend:
    """State the servicers share: the backends by model, the admission bound, the requests in flight."""

    backends: list[Backend]
    config: FrontendConfig
    auth_required: bool = False
    tls: bool = False
    models: dict[str, ModelSpec] = field(default_factory=dict)
    model2backends: dict[str, list[Backend]] = field(default_factory=dict)
    request_ids: set[str] = field(default_factory=set)
    id_prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("the front end needs at least one backend")
        self.admission = Admission(self.config.max_in_flight)
        for b in self.backends:
            if not isinstance(b, Backend):
                raise TypeError(f"{type(b).__name__} does not implement moeray.actors.frontend_backend.Backend")
            spec = ModelSpec(name=b.model_name, max_context=b.max_context, vocab_size=b.vocab_size)
            if self.models.setdefault(spec.name, spec) != spec:
                raise ValueError(f"backends for model {spec.name!r} disagree: {self.models[spec.name]} vs {spec}")
            self.model2backends.setdefault(spec.name, []).append(b)

    def validate(self, data: dict[str, Any]) -> GenerateRequest:
        """A request as a dict (the wire's fields) -> validated against the served models."""
        return parse_generate_request(data, self.models, max_prompt_bytes=self.config.max_prompt_bytes)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TextDelta]:
        """Stream one validated request; the last delta has finish_reason and usage."""
        arrival_s = time.monotonic()
        client_id = request.request_id or uuid.uuid4().hex
        request_id = f"{self.id_prefix}:{client_id}"
        if request_id in self.request_ids:
            raise DuplicateRequestError(f"request_id: {client_id!r} is already in flight; use another id")
        if not self.admission.try_acquire():
            raise CapacityError(f"server busy: {self.admission.limit} requests already in flight; retry later")
        self.request_ids.add(request_id)
        try:
            async for response in self._run(request, request_id, client_id, arrival_s):
                yield response
        finally:
            self.request_ids.discard(request_id)
            self.admission.release()

    async def _run(self, request: GenerateRequest, request_id: str, client_id: str, arrival_s: float):
        backends = self.model2backends[request.model]
        prompt_ids = await self._tokenize(request, backends[0])
        validate_prompt_length(request, len(prompt_ids), self.models[request.model])
        params = to_sampling_params(request)
        detokenizer(backends[0], request.skip_special_tokens)  # refused before anything runs
        backend, stream, delta = await self._start(backends, request_id, prompt_ids, params)
        text = TextStream(detokenizer(backend, request.skip_special_tokens), request.stop,
                          request.include_stop_str_in_output)
        num_tokens, first_token_s, backend_done = 0, None, False
        try:
            while True:
                backend_done = delta.finish_reason is not None
                num_tokens += len(delta.token_ids)
                if first_token_s is None and delta.token_ids:
                    first_token_s = time.monotonic()
                piece = text.push(delta.token_ids)
                finish = "stop" if text.stopped else delta.finish_reason
                if finish:
                    piece += text.flush()
                out = TextDelta(client_id, piece, list(delta.token_ids), finish,
                                list(delta.logprobs or []) if request.logprobs else [],
                                list(delta.top_logprobs or []), prompt_logprobs=delta.prompt_logprobs)
                if finish:
                    now = time.monotonic()
                    out.usage = Usage(len(prompt_ids), num_tokens, (first_token_s or now) - arrival_s,
                                      now - arrival_s, delta.num_cached_tokens)
                yield out
                if finish:
                    return
                delta = await _next_delta(stream, backend)
        finally:
            await _close_stream(stream)
            if not backend_done:
                await _cancel_quietly(backend, request_id)

    async def _tokenize(self, request: GenerateRequest, backend: Backend) -> list[int]:
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        if len(request.prompt) > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(backend.tokenize, request.prompt)
        return backend.tokenize(request.prompt)

    async def _start(self, backends: list[Backend], request_id: str, prompt_ids: list[int], params):
        """Open the stream on the least-loaded backend that produces a first delta; fail over until one does."""
        last_error: BaseException | None = None
        # cache-aware: the actor most likely to hold this prompt's prefix, bounded by load (router/affinity.py)
        order = order_by_affinity(backends, prompt_ids, cache_salt=params.cache_salt) if len(backends) > 1 else backends
        for backend in order:
            stream = None
            try:
                stream = await _open_stream(backend, request_id, prompt_ids, params)
                return backend, stream, await _next_delta(stream, backend)
            except BackendUnavailableError as e:
                logger.warning("backend unavailable for %s, trying another: %s", request_id, e)
                last_error = e
                await _close_stream(stream)
                await _cancel_quietly(backend, request_id)
            except BaseException:
                await _close_stream(stream)
                await _cancel_quietly(backend, request_id)
                raise
        raise BackendUnavailableError(f"no backend for model could serve the request: {last_error}")

    async def first_answer(self, call: Callable[[Backend], Awaitable[dict]]) -> dict:
        """Ask the backends in turn (status and admin ops); the first that is reachable answers."""
        last_error: BaseException | None = None
        for backend in self.backends:
            try:
                return await call(backend)
            except BackendUnavailableError as e:
                last_error = e
        raise BackendUnavailableError(f"no backend answered: {last_error}")


def detokenizer(backend: Backend, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """The backend's detokenize; with skip_special_tokens False, one that keeps special tokens in the text."""
    if skip_special_tokens:
        return backend.detokenize
    if "skip_special_tokens" not in inspect.signature(backend.detokenize).parameters:
        raise RequestError(f"skip_special_tokens: {type(backend).__name__} cannot keep special tokens; omit it")
    return functools.partial(backend.detokenize, skip_special_tokens=False)


async def _next_delta(stream: Any, backend: Backend) -> StepDelta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise BackendUnavailableError(f"{type(backend).__name__} ended a stream without a finish reason") from None
