"""common/procstat: the calling thread's run-queue wait from Linux's schedstat, None where there is none."""

import os
import threading

import pytest

from moeray.common import procstat


@pytest.mark.skipif(not os.path.exists(procstat.SCHEDSTAT), reason="no /proc/thread-self/schedstat here")
def test_cpu_wait_is_this_threads_and_never_goes_back():
    a = procstat.cpu_wait_s()
    sum(range(200_000))  # some work: the wait can only grow
    b = procstat.cpu_wait_s()
    assert a is not None and 0 <= a <= b
    other: list = []
    t = threading.Thread(target=lambda: other.append(procstat.cpu_wait_s()))
    t.start()
    t.join()
    assert other[0] is not None and other[0] >= 0  # a new thread reads its own counter


def test_missing_or_malformed_schedstat_gives_none(monkeypatch, tmp_path):
    monkeypatch.setattr(procstat, "SCHEDSTAT", str(tmp_path / "absent"))
    assert procstat.cpu_wait_s() is None
    bad = tmp_path / "schedstat"
    bad.write_text("12345\n")
    monkeypatch.setattr(procstat, "SCHEDSTAT", str(bad))
    assert procstat.cpu_wait_s() is None
    bad.write_text("100 2500000000 7\n")
    assert procstat.cpu_wait_s() == 2.5
