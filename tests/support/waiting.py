"""Eventual outcomes, not timings: poll a condition until it holds."""

from __future__ import annotations

import time


def wait_for(pred, timeout_s: float = 60.0, period_s: float = 0.25):
    """Return pred()'s first truthy value; AssertionError if none comes within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(period_s)
    raise AssertionError("condition not reached in time")
