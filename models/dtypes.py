"""The serving dtype, chosen at run time: CPUs differ by orders of magnitude in bf16 speed.

`auto` resolves to bfloat16 where the device computes it fast and float32 elsewhere:
- CUDA / NPU: bfloat16;
- CPU: bfloat16 when /proc/cpuinfo lists `amx_bf16` or `avx512_bf16` (oneDNN runs bf16 GEMMs natively there:
  5.6x fp32 measured on a Xeon with AMX), float32 otherwise (an AVX2-only EPYC ran bf16 matmul ~400x slower than
  fp32). Where cpuinfo cannot be read (not Linux) a tiny timed matmul decides.

`float32` is exact: the reference protocol (1e-4 against transformers) holds only there.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Literal

import torch

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

log = logging.getLogger("moeray.dtype")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The first CPU's feature flags, or None where cpuinfo is not readable (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


def bf16_matmul_speedup(n: int = 256, repeats: int = 5) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU (best of `repeats`): > 1 means bf16 is faster."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        torch.mm(x, y)  # warm-up (oneDNN primitive creation)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, y)
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    return times[torch.float32] / times[torch.bfloat16]


def cpu_bf16_is_fast(flags: frozenset[str] | None) -> tuple[bool, str]:
    """(bf16 is fast on this CPU, why) from its flags; measured where the flags are unknown."""
    if flags is not None:
        hit = [f for f in BF16_CPU_FLAGS if f in flags]
        return bool(hit), (f"cpu flags {', '.join(hit)}" if hit else f"cpu lacks {' and '.join(BF16_CPU_FLAGS)}")
    speedup = bf16_matmul_speedup()
    return speedup >= 1.0, f"cpu flags unknown; measured bf16 matmul {speedup:.2f}x fp32"


def resolve_dtype(name: DtypeName | str, device: str | torch.device = "cpu", reduced_ok: bool = True) -> torch.dtype:
    """The torch dtype a serving `dtype` setting means on `device` (`auto` decided as the module says).
    `reduced_ok=False` (a model family that runs in float32 only): `auto` is float32, and an explicit bfloat16 /
    float16 is a ValueError naming the setting."""
    if name in DTYPES:
        if not reduced_ok and name != "float32":
            raise ValueError(f"dtype {name}: this model family runs in float32 only; set dtype: float32 or auto")
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return _auto(torch.device(device).type) if reduced_ok else torch.float32


@functools.cache
def _auto(device_type: str) -> torch.dtype:
    """Decided once per device type per process, and logged then."""
    if device_type in ("cuda", "npu"):
        dtype, why = torch.bfloat16, f"{device_type} device"
    else:
        fast, why = cpu_bf16_is_fast(cpu_flags())
        dtype = torch.bfloat16 if fast else torch.float32
    log.info("dtype auto -> %s on %s (%s)", str(dtype).removeprefix("torch."), device_type, why)
    return dtype
