"""Eventual outcomes, not timings: poll a condition until it holds."""

from __future__ import annotations

import functools
import time


def wait_for(pred, timeout_s: float = 60.0, period_s: float = 0.25, what: str = "condition"):
    """Return pred()'s first truthy value; AssertionError naming `what` if none comes within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(period_s)


# the e2e tests' cheap local checks: shorter limit, tighter polling
wait_until = functools.partial(wait_for, timeout_s=30.0, period_s=0.05)
