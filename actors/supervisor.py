"""RequestSupervisor: a request's life across gating actors -- submit, poll, resubmit, cancel.

The batch `Deployment.generate()` and the streaming `Deployment.stream()` (the front end's backend) both run
their requests through here, so there is one failover path:

    submit   to the chosen gating actor (round robin unless the caller chose one)
    poll     every actor's live requests in one call per actor; deltas are handed to the caller in order
    failover the actor died (ActorGoneError), or answered LOST (it restarted and forgot the request):
             resubmit -- same request id, prompt, params and the tokens already delivered -- to another
             actor (the restarted one last), which rebuilds the request from the KV store and goes on
    retry    the actor is unreachable for a moment or slow to answer (ActorTransientError / ActorTimeoutError):
             poll the SAME actor again; the request is still running there
    move     while another gating actor exists: unreachable for `move_after_s`, or a poll unanswered `move_after_s`
             past its own timeout (a restarting actor answers "unavailable", or holds the call, until its
             __init__ has loaded the model: seconds): resubmit there as on a failover, and cancel on the old
             one (best effort: it frees the blocks if the actor was only slow)
    cancel   on an early exit, free the request's blocks where it runs

Failures are typed (common.errors), never matched by message.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from moeray.actors.handles import GatingHandle
from moeray.common.errors import (
    ActorError,
    ActorGoneError,
    ActorTimeoutError,
    BackendUnavailableError,
    DuplicateRequestError,
)
from moeray.common.sampling import SamplingParams, StepDelta

LOST = "lost"  # poll's answer for a request the gating actor does not know (it restarted): resubmit it


@dataclass(slots=True)
class Tracked:
    """One supervised request. `output_ids` are the tokens already handed to the caller."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    gating: int = -1  # index of the gating actor serving it now
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False


class RequestSupervisor:
    def __init__(self, gating: Sequence[GatingHandle], failover_timeout_s: float = 120.0, poll_s: float = 1.0,
                 retry_s: float = 0.2, move_after_s: float = 2.0) -> None:
        self.gating = list(gating)
        self.failover_timeout_s = failover_timeout_s
        self.poll_s, self.retry_s, self.move_after_s = poll_s, retry_s, move_after_s
        self.failovers = 0  # resubmissions after a lost gating actor (tests and metrics read it)
        self._rr = itertools.count()
        self._background: set[asyncio.Task] = set()  # best-effort cancels on actors we moved away from

    def pick(self) -> int:
        return next(self._rr) % len(self.gating)

    # ---- the life of a set of requests -----------------------------------------------------------------
    async def submit(self, requests: Sequence[Tracked]) -> None:
        """Queue every request on its actor (`gating` < 0: round robin). A RequestError is raised as is."""
        for r in requests:
            if r.gating < 0:
                r.gating = self.pick()
        outcomes = await asyncio.gather(*[self._submit_to(r.gating, r) for r in requests], return_exceptions=True)
        failed = [r for r, o in zip(requests, outcomes, strict=True) if isinstance(o, ActorError)]
        for o in outcomes:
            if isinstance(o, BaseException) and not isinstance(o, ActorError):
                raise o
        if failed:
            await self._failover(failed)

    async def run(self, requests: Sequence[Tracked], deadline: float | None = None
                  ) -> AsyncIterator[tuple[Tracked, StepDelta]]:
        """Poll until every request has finished, yielding (request, delta) as deltas arrive."""
        by_id = {r.request_id: r for r in requests}
        stalled_since: dict[int, float] = {}  # actor -> when it last stopped answering
        while any(not r.finished for r in requests):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"requests did not finish in time: {[r.request_id for r in requests][:3]}...")
            live: dict[int, list[Tracked]] = {}
            for r in requests:
                if not r.finished:
                    live.setdefault(r.gating, []).append(r)
            answers = await asyncio.gather(*[self._poll(gi, rs) for gi, rs in live.items()], return_exceptions=True)
            for (gi, rs), answer in zip(live.items(), answers, strict=True):
                if isinstance(answer, ActorGoneError):
                    await self._failover(rs)
                elif isinstance(answer, ActorError):  # transient or slow: the same actor, after a pause
                    since = stalled_since.setdefault(gi, time.monotonic())
                    held = isinstance(answer, ActorTimeoutError)  # the poll itself waited move_after_s extra
                    if len(self.gating) > 1 and (held or time.monotonic() - since > self.move_after_s):
                        stalled_since.pop(gi, None)
                        await self._move(gi, rs)
                        continue
                    if time.monotonic() - since > self.failover_timeout_s:
                        raise BackendUnavailableError(f"gating actor {gi} unreachable for "
                                                      f"{self.failover_timeout_s:.0f}s: {answer}") from answer
                    await asyncio.sleep(self.retry_s)
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    stalled_since.pop(gi, None)
                    lost = [by_id[rid] for rid, ds in answer.items() if ds and ds[-1].finish_reason == LOST]
                    for rid, deltas in answer.items():
                        r = by_id[rid]
                        if r in lost:
                            continue
                        for d in deltas:
                            r.output_ids.extend(d.token_ids)
                            r.finished = d.finish_reason is not None
                            yield r, d
                    if lost:
                        await self._failover(lost)

    async def stream(self, request: Tracked) -> AsyncIterator[StepDelta]:
        """One request's deltas, failover included; an early exit cancels it where it runs."""
        try:
            await self.submit([request])
            async for _, delta in self.run([request]):
                yield delta
        finally:
            if not request.finished:
                await self.cancel([request])

    async def cancel(self, requests: Sequence[Tracked]) -> None:
        """Best effort: free the blocks of unfinished requests (an unreachable actor frees them on restart)."""
        calls = [self.gating[r.gating].cancel(r.request_id).wait(10.0) for r in requests
                 if not r.finished and r.gating >= 0]
        await asyncio.gather(*calls, return_exceptions=True)

    # ---- steps ---------------------------------------------------------------------------------------
    async def _submit_to(self, gi: int, r: Tracked) -> None:
        try:
            await self.gating[gi].submit(r.request_id, r.prompt_ids, r.params, r.output_ids)
        except DuplicateRequestError:
            pass  # that actor runs it already (an earlier submit got through): poll it there
        r.gating = gi

    async def _poll(self, gi: int, requests: list[Tracked]) -> dict[str, list[StepDelta]]:
        # the actor answers within poll_s; past that plus a margin, call it slow (ActorTimeoutError). With another
        # actor to move to, the margin is move_after_s (its event loop answers polls during a long step)
        margin = self.move_after_s if len(self.gating) > 1 else 30.0
        return await self.gating[gi].poll([r.request_id for r in requests], self.poll_s).wait(self.poll_s + margin)

    async def _move(self, gi: int, requests: list[Tracked]) -> None:
        """Requests whose actor `gi` stays unreachable: resubmit them elsewhere, cancel them on `gi`."""
        await self._failover(requests)
        for r in requests:
            if r.gating != gi:  # the call is sent now; only its answer is awaited in the background
                task = asyncio.create_task(self._quietly(self.gating[gi].cancel(r.request_id)))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(reply) -> None:
        try:
            await reply.wait(30.0)
        except ActorError:
            pass  # restarted (it forgot the request) or gone: nothing is left to free

    async def _failover(self, requests: list[Tracked]) -> None:
        """Resubmit requests whose gating actor died or forgot them: other actors first, then that one."""
        self.failovers += 1
        deadline = time.monotonic() + self.failover_timeout_s
        pending = list(requests)
        while pending:
            lost = {r.gating for r in pending}
            order = [i for i in range(len(self.gating)) if i not in lost] + sorted(lost)
            for gi in order:
                outcomes = await asyncio.gather(*[self._submit_to(gi, r) for r in pending], return_exceptions=True)
                for o in outcomes:
                    if isinstance(o, BaseException) and not isinstance(o, ActorError):
                        raise o
                pending = [r for r, o in zip(pending, outcomes, strict=True) if isinstance(o, ActorError)]
                if not pending:
                    return
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"no gating actor came back within {self.failover_timeout_s:.0f}s "
                                              f"for requests {[r.request_id for r in pending][:3]}")
            await asyncio.sleep(self.retry_s)
