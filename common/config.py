"""Serving configuration (pydantic, `extra="forbid"`): what `deploy()`, `moeray serve --config` and the
gRPC front end read. Every field is validated with a message that names it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeray.common.errors import ConfigError


def default_model_path() -> str:
    """The bundled demo model (shipped inside the package)."""
    return str(Path(__file__).resolve().parent.parent / "models" / "demo_model")


class AutoscaleConfig(BaseModel):
    """Replica bounds and the thresholds of the autoscaling rule (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=1, description="replicas per expert group, at least")
    max_replicas: int = Field(1, ge=1, description="replicas per expert group, at most")
    target_utilization: float = Field(0.7, gt=0.0, le=1.0, description="busy fraction to aim for")
    downscale_factor: float = Field(0.5, gt=0.0, lt=1.0, description="cold below target * this")
    upscale_delay_s: float = Field(30.0, ge=0.0)
    downscale_delay_s: float = Field(300.0, ge=0.0)
    cooldown_s: float = Field(60.0, ge=0.0, description="minimum time between two changes of one group")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= "
                             f"min_replicas ({self.min_replicas})")
        return self


class KVStoreConfig(BaseModel):
    """The KV-store service: shard actors holding compressed KV blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    num_shards: int = Field(2, ge=1)
    replication: int = Field(2, ge=1)
    codec: Literal["none", "fp16", "int8", "int4"] = "none"
    shard_capacity_mb: float = Field(256.0, gt=0)
    max_inflight_writes: int = Field(64, ge=1)
    shard_num_cpus: float = Field(0.1, ge=0)
    spill_dir: str | None = None  # evicted blocks spill to disk here (per shard, on the shard's node)
    spill_capacity_mb: float | None = Field(None, gt=0, description="disk tier bound; None: unbounded")

    @model_validator(mode="after")
    def _check(self) -> KVStoreConfig:
        if self.replication > self.num_shards:
            raise ValueError(f"kv_store.replication ({self.replication}) must be <= kv_store.num_shards "
                             f"({self.num_shards})")
        return self


class ServeConfig(BaseModel):
    """How to run a model on the current Ray cluster. Defaults fit a 2-core machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default_factory=default_model_path, description="HF folder: config.json + safetensors")
    model_name: str | None = None  # served name; defaults to the folder name
    num_expert_groups: int = Field(2, ge=1)
    expert_replicas: int = Field(1, ge=1)
    placement: Literal["round_robin", "blocks"] = "round_robin"
    device: Literal["cpu", "gpu", "npu"] = "cpu"
    allow_cpu_fallback: bool = False
    # where the gating actors run attention, gate, shared experts, the paged KV cache and sampling: each asks for one
    # GPU / NPU (deploy() refuses, naming the fields, when the cluster has too few); without the device's torch
    # support it fails naming the fix, or computes on the CPU with allow_cpu_fallback
    gating_device: Literal["cpu", "gpu", "npu"] = "cpu"
    # weights, KV cache and compute; auto: bfloat16 where the device computes it fast (GPU, NPU, CPUs with AMX or
    # AVX512-BF16), float32 elsewhere, decided at start-up (moeray.models.dtypes). float32 is exact.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # quantize a bf16/fp32 checkpoint\'s routed experts on load (held packed; quantized checkpoints are served
    # as stored whatever this says: set it only for plain ones)
    expert_quant: Literal["none", "int8", "fp8", "mxfp4"] = "none"
    expert_num_cpus: float = Field(0.25, ge=0)
    gating_num_cpus: float = Field(0.5, ge=0)
    num_gating_actors: int = Field(1, ge=1)
    # torch threads per process; None: derived (threads_for): with transport local the gating process gets every
    # core it may use, on Ray each actor its CPU share rounded up (actors share the cores).
    torch_threads: int | None = Field(None, ge=1)
    transport: Literal["ray", "local"] = "ray"
    # how expert-call tensors travel with transport ray: socket (each expert actor's own connection, a Unix
    # socket on its node or TCP; Ray stays the control plane: addresses, probes, restarts; actors/channel.py);
    # object_store (one Ray task per call, through Ray's object store; actors/transport.py); nixl (Ray Direct
    # Transport, one-sided NIXL: device to device, no collective group; needs moeray[rdt]; actors/rdt.py);
    # auto: nixl when the gating engine and the experts both compute on GPUs and NIXL is installed, else socket.
    # Forcing nixl on CPU actors is a test/diagnostic setting (same code path, CPU memory over UCX).
    tensor_transport: Literal["auto", "socket", "object_store", "nixl"] = "auto"
    # micro-batches per step, run as a ping-pong (one's attention while another's experts run); 0: chosen per
    # step (2 for 8+ sequences when the experts or the gating engine are on accelerators, else 1)
    micro_batches: int = Field(0, ge=0, le=8)
    block_size: int = Field(16, ge=1)
    kv_cache_blocks: int = Field(1024, ge=1)
    # the whole KV cache of one gating actor in bytes, all pools and prefill chunks included; replaces
    # kv_cache_blocks when set
    kv_cache_bytes: int | None = Field(None, ge=1)
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "fp8_e4m3"] = "auto"  # auto = the serving dtype
    prefix_caching: bool = True  # full blocks stay in the gating actor's cache after their request
    max_num_batched_tokens: int = Field(512, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_restarts: int = Field(3, ge=-1)
    expert_call_timeout_s: float = Field(60.0, gt=0)
    kv_store: KVStoreConfig = KVStoreConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    controller: bool = True  # health checks, failover, autoscaling, rebalancing
    health_period_s: float = Field(1.0, gt=0)
    health_timeout_s: float = Field(2.0, gt=0)
    health_failure_threshold: int = Field(2, ge=1)
    # an expert or gating actor that Ray still holds alive but that has failed every ping for this long is hung (a
    # stopped or deadlocked process): the controller kills it so Ray restarts it (no replica needed; its calls wait)
    hung_restart_s: float = Field(10.0, gt=0)
    # an actor's constructor (a start, a replacement or Ray's restart) still running after this long is hung (a stuck
    # read of the checkpoint, say): the controller kills that process so Ray starts it again; deploy() waits as long
    start_timeout_s: float = Field(600.0, gt=0)
    namespace: str = "moeray"

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= block_size "
                             f"({self.block_size})")
        if self.hung_restart_s < self.health_timeout_s:
            raise ValueError(f"hung_restart_s ({self.hung_restart_s}) must be >= health_timeout_s "
                             f"({self.health_timeout_s}): one unanswered ping takes that long")
        if self.tensor_transport in ("nixl", "socket") and self.transport != "ray":
            raise ValueError(f"tensor_transport: {self.tensor_transport} needs transport: ray (it moves expert-call "
                             "tensors between actors); set tensor_transport: auto")
        return self

    @property
    def control_timeout_s(self) -> float:
        """Deadline of a control-plane call that does real work (a table push, the expert load, KV repair's reads and
        writes): 5 x health_timeout_s, so one hung actor cannot stall the caller."""
        return self.health_timeout_s * 5

    def threads_for(self, role: Literal["gating", "expert"]) -> int:
        """torch threads of a gating or expert-group process: `torch_threads` when set, else derived from the
        CPUs it may use (transport local: all of them; Ray: its num_cpus share, at least 1)."""
        if self.torch_threads is not None:
            return self.torch_threads
        if role == "gating" and self.transport == "local":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        share = self.gating_num_cpus if role == "gating" else self.expert_num_cpus
        return max(1, math.ceil(share))

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> ServeConfig:
        """Load a YAML or JSON file; `overrides` (non-None) win over the file."""
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of ServeConfig fields at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**data)

    @classmethod
    def build(cls, **fields) -> ServeConfig:
        """Like the constructor, but raises ConfigError naming each bad field."""
        try:
            return cls(**fields)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err.get("loc", ()))
                msgs.append(f"{loc}: {err.get('msg', '').removeprefix('Value error, ')}" if loc else err["msg"])
            raise ConfigError("invalid serve config: " + "; ".join(msgs)) from None
