"""Shared benchmark helpers: timing by median of repeats, machine facts, JSON out.

Benchmarks report ratios against peers measured in the same run; the machine facts recorded here (load
average, thread count) say how noisy that run was.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_median(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Run `fn` warmup + repeats times; return (median seconds, every timed run in seconds)."""
    assert repeats >= 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_times(probes: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every probe once per round, `repeats` rounds after `warmup` untimed ones, so that all of them see
    the same background load; name -> sorted times in seconds."""
    times: dict[str, list[float]] = {name: [] for name in probes}
    for r in range(warmup + repeats):
        for name, fn in probes.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts) for name, ts in times.items()}


def host_info() -> dict[str, Any]:
    """CPU model, cores, Python and the 1-minute load average now (no torch)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(load[0], 2),
            "python": platform.python_version()}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, torch threads, load average when the run started."""
    return {**host_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def process_tree_cpu_s(root_pid: int, exclude: tuple[int, ...] = ()) -> float:
    """CPU seconds (user + system) used so far by `root_pid` and all its descendants, minus the subtrees rooted
    at `exclude` (Linux /proc; 0.0 elsewhere). Threads count through their process."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, cpu seconds)
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        if pid in exclude or pid not in stats:
            continue
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def finish(path: Path, obj: dict[str, Any], text: str | None = None) -> int:
    """A benchmark main's tail: print `text` (when given), write obj as JSON to path, exit status 0."""
    if text is not None:
        print(text)
    write_json(path, obj)
    return 0


def load_dense_checkpoint(path: Path) -> tuple[Any, Any, Any]:
    """-> (ModelConfig, Checkpoint, the dense part built and loaded from it, in eval mode) of the checkpoint at path."""
    from moeray.models.checkpoint import Checkpoint, load_dense
    from moeray.models.config import ModelConfig
    from moeray.models.registry import build_dense_model

    model_cfg = ModelConfig.from_pretrained(str(path))
    ckpt = Checkpoint(str(path))
    dense = build_dense_model(model_cfg)
    load_dense(dense, model_cfg, ckpt)
    dense.eval()
    return model_cfg, ckpt, dense


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den
