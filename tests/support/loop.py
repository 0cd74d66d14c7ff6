"""An event loop in a daemon thread: the e2e servers run there; blocking test code submits coroutines to it."""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    def __init__(self, name: str = "server-loop", timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s or self.timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
