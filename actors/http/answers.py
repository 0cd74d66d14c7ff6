"""The shape of OpenAI's answers: whole responses and SSE chunks, choices, log-probabilities, usage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moeray.actors.http.metrics import HTTPMetrics
from moeray.actors.http.schemas import api_error_for
from moeray.actors.http.stream import Output, Piece, Runs, sse, usage
from moeray.common.sampling import PromptLogprobs, TopLogprobs


@dataclass
class Call:
    """One validated OpenAI call: what to run (one request per choice) and how to shape the answer."""

    kind: Literal["completion", "chat"]
    id: str
    model: str
    created: int
    requests: list[Any]
    stream: bool
    include_usage: bool
    logprobs: bool
    num_top: int  # alternatives per token
    token_text: Callable[[int], str]
    fingerprint: str
    echo: str = ""  # completions' echo: the prompt text, put before the first text
    prompt_ids: list[int] = field(default_factory=list)  # known when prompt log-probabilities are asked for
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs (k): per choice (completions), top-level (chat)
    echo_logprobs: bool = False  # completions' echo with logprobs: the prompt tokens lead `logprobs`
    best_of: int = 0  # > 0: return this many of the requests' outputs, the highest cumulative logprob first

    def envelope(self, chunk: bool) -> dict[str, Any]:
        obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
        return {"id": self.id, "object": obj[self.kind], "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def logprobs_of(self, token_ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[TopLogprobs],
                    offset: int) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        tops = list(tops) or [[] for _ in tokens]
        if self.kind == "chat":
            content = []
            for s, lp, top in zip(tokens, logprobs, tops, strict=True):
                alts = [{"token": (a := self.token_text(t)), "logprob": v, "bytes": list(a.encode())} for t, v in top]
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alts})
            return {"content": content}
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        top_dicts = None
        if self.num_top:  # k alternatives, plus the sampled token when it is not among them (as vLLM and OpenAI)
            top_dicts = []
            for s, lp, top in zip(tokens, logprobs, tops, strict=True):
                d = {self.token_text(t): v for t, v in top}
                d.setdefault(s, lp)
                top_dicts.append(d)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}

    def prompt_logprobs_of(self, entries: PromptLogprobs | None) -> list | None:
        """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {logprob, rank,
        decoded_token}}, the prompt token first, then the k alternatives."""
        if entries is None:
            return None
        out: list = []
        for tok, entry in zip(self.prompt_ids, entries, strict=True):
            if entry is None:
                out.append(None)
                continue
            lp, rank, top = entry
            d = {str(tok): {"logprob": lp, "rank": rank, "decoded_token": self.token_text(tok)}}
            for r, (t, v) in enumerate(top[:self.prompt_logprobs], 1):
                d.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": self.token_text(t)})
            out.append(d)
        return out

    def echo_logprobs_of(self, entries: PromptLogprobs | None) -> dict | None:
        """Completions' echo with logprobs: the prompt tokens in the legacy shape (the first has no logprob)."""
        if entries is None:
            return None
        tokens = [self.token_text(t) for t in self.prompt_ids]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        lps = [None if e is None else e[0] for e in entries]
        tops = None
        if self.num_top:
            tops = []
            for s, e in zip(tokens, entries, strict=True):
                if e is None:
                    tops.append(None)
                    continue
                d = {self.token_text(t): v for t, v in e[2][:self.num_top]}
                d.setdefault(s, e[0])
                tops.append(d)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, text: str, token_ids, logprobs, tops, finish_reason: str | None, chunk: bool,
               offset: int = 0, prompt_lps: PromptLogprobs | None = None) -> dict:
        out: dict[str, Any] = {"index": index}
        if self.kind == "completion":
            out["text"] = text
        elif chunk:
            out["delta"] = {"content": text} if text else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = self.logprobs_of(token_ids, logprobs, tops, offset)
        if self.kind == "completion" and self.echo_logprobs and prompt_lps is not None and out["logprobs"]:
            head, tail = self.echo_logprobs_of(prompt_lps), out["logprobs"]
            out["logprobs"] = {k: head[k] + tail[k] if head[k] is not None else None for k in head}
        out["finish_reason"] = finish_reason
        if self.kind == "completion" and self.prompt_logprobs is not None and (prompt_lps is not None or not chunk):
            out["prompt_logprobs"] = self.prompt_logprobs_of(prompt_lps)
        return out

    def whole(self, outputs: list[Output]) -> dict[str, Any]:
        if self.best_of:  # vLLM's best_of: the n best by cumulative logprob; usage counts those n
            outputs = sorted(outputs, key=lambda o: sum(o.logprobs), reverse=True)[:self.best_of]
        choices = [self.choice(i, self.echo + o.text, o.token_ids, o.logprobs, o.top_logprobs, o.finish_reason,
                               chunk=False, offset=len(self.echo), prompt_lps=o.prompt_logprobs)
                   for i, o in enumerate(outputs)]
        answer = {**self.envelope(chunk=False), "choices": choices, "usage": usage(outputs)}
        if self.kind == "chat" and self.prompt_logprobs is not None:
            answer["prompt_logprobs"] = self.prompt_logprobs_of(outputs[0].prompt_logprobs if outputs else None)
        return answer

    async def chunks(self, runs: Runs, first: tuple[int, Piece | None], metrics: HTTPMetrics,
                     arrival_s: float) -> AsyncIterator[str]:
        """The SSE body: one chunk per engine step and choice, then usage (if asked for), then [DONE]."""
        n = len(self.requests)
        outputs = [Output() for _ in range(n)]
        last_s = [None] * n
        try:
            if self.kind == "chat":
                for i in range(n):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
                    yield sse({**self.envelope(chunk=True), "choices": [role], **self._usage_slot()})
            item = first
            while True:
                index, piece = item
                if piece is not None:
                    metrics.observe_piece(piece, arrival_s, last_s, index)
                    out = outputs[index]
                    prefix = self.echo if not out.text and not out.token_ids and self.echo else ""
                    offset = len(out.text) + (len(self.echo) if out.token_ids else 0)
                    out.add(piece)
                    choice = self.choice(index, prefix + piece.text, piece.token_ids, piece.logprobs,
                                         piece.top_logprobs, piece.finish_reason, True, offset + len(prefix),
                                         piece.prompt_logprobs)
                    extra = {}
                    if self.kind == "chat" and self.prompt_logprobs is not None and piece.prompt_logprobs is not None:
                        extra["prompt_logprobs"] = self.prompt_logprobs_of(piece.prompt_logprobs)
                    yield sse({**self.envelope(chunk=True), "choices": [choice], **self._usage_slot(), **extra})
                if not runs.num_open:
                    break
                item = await runs.next()
            if self.include_usage:
                yield sse({**self.envelope(chunk=True), "choices": [], "usage": usage(outputs)})
            metrics.finished(self.kind, 200, time.monotonic() - arrival_s)
        except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
            error = api_error_for(e)
            metrics.finished(self.kind, error.status, time.monotonic() - arrival_s)
            yield sse(error.body())
        finally:
            runs.cancel()
        yield sse("[DONE]")

    def _usage_slot(self) -> dict[str, Any]:
        return {"usage": None} if self.include_usage else {}
