"""Placement -> Ray resource request and torch device (DESIGN.md "Devices").

NPU -> resources={"NPU": 1}, torch_npu, "npu:0" (Ray sets ASCEND_RT_VISIBLE_DEVICES to the granted chip; with
RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES the index comes from the runtime context). GPU -> num_gpus=1,
"cuda:0". CPU -> num_cpus (fractional); CPU actors never touch an accelerator (Ray 2.60 shows them all).
"""

from __future__ import annotations

import os
from typing import Any

from moeray.common.errors import ConfigError


def actor_options(device: str, num_cpus: float) -> dict[str, Any]:
    """Ray actor options for an expert actor placed on `device`."""
    if device == "cpu":
        return {"num_cpus": num_cpus}
    if device == "gpu":
        return {"num_cpus": num_cpus, "num_gpus": 1}
    if device == "npu":
        return {"num_cpus": num_cpus, "resources": {"NPU": 1}}
    raise ConfigError(f"device: {device!r} is not one of cpu, gpu, npu")


def device_type(device: str) -> str:
    """The torch device type a placement computes on ("cuda", "npu", "cpu"), without touching the device."""
    types = {"cpu": "cpu", "gpu": "cuda", "npu": "npu"}
    if device not in types:
        raise ConfigError(f"device: {device!r} is not one of cpu, gpu, npu")
    return types[device]


def torch_device(device: str, allow_cpu_fallback: bool = False) -> str:
    """Inside the actor: the torch device string for its placement (imports torch_npu only for NPUs)."""
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
        if allow_cpu_fallback:
            return "cpu"
        raise ConfigError("device 'gpu' was requested but torch sees no CUDA device: install a CUDA build of torch "
                          "or set allow_cpu_fallback: true")
    if device == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            if allow_cpu_fallback:
                return "cpu"
            raise ConfigError("device 'npu' needs torch_npu: pip install 'moeray[ascend]' on the NPU nodes, "
                              "or set allow_cpu_fallback: true") from None
        return f"npu:{_npu_index()}"
    raise ConfigError(f"device: {device!r} is not one of cpu, gpu, npu")


def _npu_index() -> int:
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"):
        import ray

        ids = ray.get_runtime_context().get_accelerator_ids().get("NPU", [])
        return int(ids[0]) if ids else 0
    return 0  # Ray made the granted chip the only visible one
