"""A call's runs: one front-end request per choice (n > 1 fans out here), each pumped by its own task.

The front end's step messages become `Piece`s at this edge (the only place that reads the front end's message
type). Each run's task is cancelled exactly once when the client goes away (Starlette cancels the response
repeatedly, which would cut the front end's clean-up short); the front end then cancels the request in the
backend, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from moeray.actors.http.schemas import APIError
from moeray.common.sampling import PromptLogprobs, TopLogprobs

FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Piece:
    """One step's worth of one choice: text and tokens added, and on the last one finish_reason and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # on a choice's first piece, when asked for

    @classmethod
    def of(cls, msg: Any) -> Piece:
        """The front end's step message (actors/frontend_core.py TextDelta) -> a Piece."""
        piece = cls(msg.text, list(msg.token_ids), list(msg.logprobs), [list(t) for t in msg.top_logprobs],
                    FINISH_REASONS.get(msg.finish_reason, msg.finish_reason) or None,
                    prompt_logprobs=getattr(msg, "prompt_logprobs", None))
        if msg.usage is not None:
            u = msg.usage
            piece.prompt_tokens, piece.completion_tokens = u.prompt_tokens, u.completion_tokens
            piece.cached_tokens = u.cached_tokens
        return piece


@dataclass(slots=True)
class Output:
    """What one choice produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, piece: Piece) -> None:
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs
        self.text += piece.text
        self.token_ids.extend(piece.token_ids)
        self.logprobs.extend(piece.logprobs)
        self.top_logprobs.extend(piece.top_logprobs)
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
            self.prompt_tokens, self.completion_tokens = piece.prompt_tokens, piece.completion_tokens
            self.cached_tokens = piece.cached_tokens


def usage(outputs: list[Output]) -> dict[str, Any]:
    """OpenAI's usage: the prompt counted once, completion tokens of all choices, cached prompt tokens."""
    prompt = max((o.prompt_tokens for o in outputs), default=0)
    completion = sum(o.completion_tokens for o in outputs)
    cached = max((o.cached_tokens for o in outputs), default=0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


_END = object()


class Runs:
    """The runs of one call; `next()` answers (choice index, Piece), (index, None) when a choice ends."""

    def __init__(self, generate: Callable[[Any], AsyncIterator[Any]], requests: list[Any],
                 tasks: set[asyncio.Task]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = []
        for index, request in enumerate(requests):
            task = asyncio.create_task(self._pump(index, generate(request)))
            tasks.add(task)  # the loop holds tasks weakly
            task.add_done_callback(tasks.discard)
            self._tasks.append(task)
        self.num_open = len(requests)

    async def _pump(self, index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with aclosing(stream) as messages:
                async for msg in messages:
                    self._queue.put_nowait((index, Piece.of(msg)))
            self._queue.put_nowait((index, _END))
        except Exception as e:  # handed to the reader, which turns it into an HTTP error
            self._queue.put_nowait((index, e))

    async def next(self) -> tuple[int, Piece | None]:
        """Raises what the front end raised for that choice."""
        index, item = await self._queue.get()
        if item is _END:
            self.num_open -= 1
            return index, None
        if isinstance(item, BaseException):
            self.num_open -= 1
            raise item
        return index, item

    def cancel(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()


async def collect(runs: Runs, n: int, observe: Callable[[Piece, int], None] | None = None) -> list[Output]:
    outputs = [Output() for _ in range(n)]
    while runs.num_open:
        index, piece = await runs.next()
        if piece is not None:
            outputs[index].add(piece)
            if observe is not None:
                observe(piece, index)
    return outputs


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, runs: Runs, step):
    """Await `step` (a coroutine reading `runs`), cancelling the runs if the client goes away first."""
    work = asyncio.ensure_future(step)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        runs.cancel()
        raise APIError(499, "client closed the request", "client_closed_request")
    return work.result()


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
