"""actors/supervisor.py: one request's life across gating actors, driven by in-process stand-ins for the actors
(scripted failures); the real actors are exercised in tests/integration and tests/slow."""

from __future__ import annotations

import asyncio

import pytest

from moeray.actors.supervisor import LOST, RequestSupervisor, Tracked
from moeray.common.errors import (
    ActorGoneError,
    ActorTimeoutError,
    ActorTransientError,
    BackendUnavailableError,
    DuplicateRequestError,
    RequestError,
)
from moeray.common.sampling import SamplingParams, StepDelta


class Answer:
    def __init__(self, value):
        self.value = value

    async def wait(self, timeout_s=None):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def __await__(self):
        return self.wait().__await__()


class Gating:
    """Emits one token per poll per request (token = index in the output); `faults` are raised by poll in order."""

    def __init__(self, max_tokens: int = 4) -> None:
        self.max_tokens = max_tokens
        self.running: dict[str, list[int]] = {}
        self.submits: list[tuple[str, list[int]]] = []
        self.poll_faults: list[BaseException | str] = []
        self.submit_faults: list[BaseException] = []
        self.cancelled: list[str] = []

    def submit(self, rid, prompt, params, output_ids=None):
        if self.submit_faults:
            return Answer(self.submit_faults.pop(0))
        if rid in self.running:
            return Answer(DuplicateRequestError(rid))
        self.submits.append((rid, list(output_ids or [])))
        self.running[rid] = list(output_ids or [])
        return Answer(None)

    def poll(self, rids, timeout_s=1.0):
        if self.poll_faults:
            fault = self.poll_faults.pop(0)
            if fault == LOST:  # restarted: forgot everything
                self.running.clear()
                return Answer({r: [StepDelta(r, [], None, LOST)] for r in rids})
            return Answer(fault)
        out = {}
        for r in rids:
            done = self.running[r]
            done.append(len(done))
            fin = "length" if len(done) == self.max_tokens else None
            out[r] = [StepDelta(r, [done[-1]], None, fin)]
        return Answer(out)

    def cancel(self, rid):
        self.cancelled.append(rid)
        return Answer(True)


def collect(sup: RequestSupervisor, reqs: list[Tracked]) -> dict[str, list[int]]:
    async def go():
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        await sup.submit(reqs)
        async for r, d in sup.run(reqs):
            out[r.request_id].extend(d.token_ids)
        return out

    return asyncio.run(go())


def reqs(n: int = 2) -> list[Tracked]:
    return [Tracked(f"r{i}", [1, 2], SamplingParams(max_tokens=4)) for i in range(n)]


def stream(sup: RequestSupervisor, r: Tracked, on_tokens) -> list[int]:
    """One request's tokens; on_tokens(tokens so far) runs after every delta (to inject a fault mid-stream)."""
    async def go():
        toks: list[int] = []
        await sup.submit([r])
        async for _, d in sup.run([r]):
            toks.extend(d.token_ids)
            on_tokens(toks)
        await asyncio.sleep(0)  # let background calls (a cancel on a moved-from actor) run
        return toks

    return asyncio.run(go())


def test_requests_spread_round_robin_and_finish():
    g = [Gating(), Gating()]
    out = collect(RequestSupervisor(g), reqs(2))
    assert out == {"r0": [0, 1, 2, 3], "r1": [0, 1, 2, 3]}
    assert [s[0] for s in g[0].submits] == ["r0"] and [s[0] for s in g[1].submits] == ["r1"]


def test_dead_actor_resubmits_elsewhere_with_the_tokens_streamed():
    g = [Gating(), Gating()]
    sup = RequestSupervisor(g, retry_s=0.0)
    r = Tracked("r0", [1, 2], SamplingParams(max_tokens=4), gating=0)

    def die(toks):
        if len(toks) == 2:
            g[0].poll_faults.append(ActorGoneError("died", "gating actor 0"))

    assert stream(sup, r, die) == [0, 1, 2, 3]  # one continuous stream
    assert g[1].submits == [("r0", [0, 1])] and sup.failovers == 1 and r.gating == 1


def test_transient_error_retries_the_same_actor():
    g = [Gating(), Gating()]
    g[0].poll_faults = [ActorTransientError("blip", "gating actor 0")] * 2
    sup = RequestSupervisor(g, retry_s=0.0)
    out = collect(sup, [Tracked("r0", [1], SamplingParams(max_tokens=4), gating=0)])
    assert out["r0"] == [0, 1, 2, 3] and sup.failovers == 0 and g[1].submits == []


def test_transient_error_that_lasts_fails_the_request():
    g = [Gating()]
    g[0].poll_faults = [ActorTransientError("blip", "gating actor 0")] * 1000
    sup = RequestSupervisor(g, failover_timeout_s=0.05, retry_s=0.01)
    with pytest.raises(BackendUnavailableError, match="unreachable"):
        collect(sup, [Tracked("r0", [1], SamplingParams(max_tokens=4), gating=0)])


def test_lost_answer_resubmits_and_duplicate_means_it_runs_there():
    g = [Gating(max_tokens=3)]
    g[0].poll_faults = [LOST]
    sup = RequestSupervisor(g, retry_s=0.0)
    out = collect(sup, [Tracked("r0", [1], SamplingParams(max_tokens=3), gating=0)])
    assert out["r0"] == [0, 1, 2] and sup.failovers == 1
    g2 = [Gating()]
    g2[0].running["x"] = []
    collect(RequestSupervisor(g2), [Tracked("x", [1], SamplingParams(), gating=0)])  # Duplicate: polled there


def test_submit_to_a_dead_actor_goes_to_a_live_one():
    g = [Gating(), Gating()]
    g[0].submit_faults = [ActorGoneError("died", "gating actor 0")]
    out = collect(RequestSupervisor(g, retry_s=0.0), [Tracked("r0", [1], SamplingParams(), gating=0)])
    assert out["r0"] == [0, 1, 2, 3] and g[1].submits == [("r0", [])]


def test_a_rejected_request_is_raised_not_failed_over():
    g = [Gating(), Gating()]
    g[0].submit_faults = [RequestError("prompt: too long")]
    with pytest.raises(RequestError, match="too long"):
        collect(RequestSupervisor(g), [Tracked("r0", [1], SamplingParams(), gating=0)])
    assert g[1].submits == []


def test_stream_cancels_when_the_caller_leaves_early():
    g = [Gating(max_tokens=100)]
    sup = RequestSupervisor(g)

    async def go():
        agen = sup.stream(Tracked("r0", [1], SamplingParams(), gating=0))
        await anext(agen)
        await agen.aclose()

    asyncio.run(go())
    assert g[0].cancelled == ["r0"]


def test_unreachable_past_move_after_moves_to_another_actor_and_cancels_there():
    # a restarting gating actor answers "unavailable" for seconds: with another actor at hand, stop waiting
    g = [Gating(), Gating()]
    sup = RequestSupervisor(g, retry_s=0.01, move_after_s=0.05)
    r = Tracked("r0", [1, 2], SamplingParams(max_tokens=4), gating=0)

    def restart(toks):
        if len(toks) == 2:
            g[0].poll_faults.extend([ActorTransientError("restarting", "gating actor 0")] * 1000)

    assert stream(sup, r, restart) == [0, 1, 2, 3]  # one continuous stream, nothing repeated or skipped
    assert g[1].submits == [("r0", [0, 1])] and r.gating == 1 and sup.failovers == 1
    assert g[0].cancelled == ["r0"]


def test_a_short_blip_does_not_move():
    g = [Gating(), Gating()]
    g[0].poll_faults = [ActorTransientError("blip", "gating actor 0")] * 2
    sup = RequestSupervisor(g, retry_s=0.0, move_after_s=30.0)
    out = collect(sup, [Tracked("r0", [1], SamplingParams(max_tokens=4), gating=0)])
    assert out["r0"] == [0, 1, 2, 3] and g[1].submits == [] and g[0].cancelled == []


class Held(Gating):
    """A restarting actor that holds calls: polls never answer (until the caller's timeout)."""

    def __init__(self):
        super().__init__()
        self.hold = False

    def poll(self, rids, timeout_s=1.0):
        if not self.hold:
            return super().poll(rids, timeout_s)

        class Never:
            async def wait(self, timeout_s=None):
                await asyncio.sleep(timeout_s)
                raise ActorTimeoutError("no answer", "gating actor 0")

        return Never()


def test_a_held_poll_moves_after_its_margin():
    g = [Held(), Gating()]
    sup = RequestSupervisor(g, retry_s=0.0, poll_s=0.01, move_after_s=0.05)
    r = Tracked("r0", [1, 2], SamplingParams(max_tokens=4), gating=0)

    def hold(toks):
        g[0].hold = len(toks) >= 1

    assert stream(sup, r, hold) == [0, 1, 2, 3]
    assert g[1].submits == [("r0", [0])] and g[0].cancelled == ["r0"]
