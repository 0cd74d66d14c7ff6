"""How long the calling thread has waited for a core: Linux's per-thread scheduler statistics.

`/proc/thread-self/schedstat` holds three numbers: nanoseconds on a CPU, nanoseconds runnable but waiting on a
run queue, and timeslices run. The second is what an oversubscribed machine costs a latency-critical thread (the
gating actor's step thread beside expert actors on the same cores): time it could have run but a core was busy.
Elsewhere (not Linux, or a kernel without schedstats) `cpu_wait_s` returns None and callers report nothing.
"""

from __future__ import annotations

SCHEDSTAT = "/proc/thread-self/schedstat"


def cpu_wait_s() -> float | None:
    """Seconds the calling thread has spent runnable but not running since it started; None where unknown."""
    try:
        with open(SCHEDSTAT) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
