"""DeltaBuffers: a gating actor's per-request step deltas waiting to be polled, bounded.

A request's buffer lives from submit until its final delta has been polled. A caller that goes away
without cancelling would leave a finished buffer forever; so finished buffers nobody polled for
`unpolled_ttl_s` are dropped, and at most `max_finished` of them are kept (oldest dropped first). Cancelled ids
are remembered (bounded too) so a late poll can answer "cancelled" rather than "lost". Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import OrderedDict

from moeray.common.sampling import StepDelta


class DeltaBuffers:
    def __init__(self, unpolled_ttl_s: float = 600.0, max_finished: int = 10_000, max_cancelled: int = 10_000):
        self.unpolled_ttl_s, self.max_finished, self.max_cancelled = unpolled_ttl_s, max_finished, max_cancelled
        self._bufs: dict[str, list[StepDelta]] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # request id -> when its last delta arrived
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self.num_dropped = 0  # finished buffers dropped unpolled

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._bufs

    def __len__(self) -> int:
        return len(self._bufs)

    def open(self, request_id: str) -> None:
        self._bufs[request_id] = []
        self._cancelled.pop(request_id, None)

    def has_deltas(self, request_id: str) -> bool:
        return bool(self._bufs.get(request_id))

    def add(self, delta: StepDelta, now: float) -> None:
        """Buffer a step's delta; a "cancelled" one closes the buffer (whoever cancelled stopped polling)."""
        rid = delta.request_id
        if delta.finish_reason == "cancelled":
            self._close(rid)
            self._cancelled[rid] = None
            while len(self._cancelled) > self.max_cancelled:
                self._cancelled.popitem(last=False)
            return
        buf = self._bufs.get(rid)
        if buf is None:
            return
        buf.append(delta)
        if delta.finish_reason is not None:
            self._finished[rid] = now
            self._evict(now)

    def take(self, request_id: str) -> list[StepDelta] | None:
        """The deltas since the last take ([] if none), or None for a request not buffered here."""
        buf = self._bufs.get(request_id)
        if buf is None:
            return None
        if buf and buf[-1].finish_reason is not None:
            self._close(request_id)
        elif buf:
            self._bufs[request_id] = []
        return buf

    def was_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def _close(self, request_id: str) -> None:
        self._bufs.pop(request_id, None)
        self._finished.pop(request_id, None)

    def _evict(self, now: float) -> None:
        while self._finished:
            rid, t = next(iter(self._finished.items()))
            if now - t <= self.unpolled_ttl_s and len(self._finished) <= self.max_finished:
                return
            self._close(rid)
            self.num_dropped += 1
