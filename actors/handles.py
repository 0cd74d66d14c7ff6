"""Typed handles: the one place each role's `.remote()` is called and Ray errors become `common.errors`.

The ray/util/queue.py pattern: a plain class (GatingActor, ExpertGroupActor, KVShardActor, Controller) is made
an actor elsewhere (actors/spawn.py); callers talk to it through a handle here. A call returns a `Reply`, which
is awaited (`await reply`) in async code or waited on (`reply.result(timeout_s)`) in blocking code; either way
a Ray error comes out as one of three `common.errors` types, decided by `classify`:

    ActorTransientError  ActorUnavailableError: unreachable for a moment; retry the SAME actor
    ActorGoneError       RayActorError / ActorDiedError: died (a restart, if any, has lost its in-memory state)
    ActorTimeoutError    no answer within the caller's timeout (the actor may still be working)

Errors the actor's own code raised on purpose (RequestError, ValueError, ...) pass through unchanged.
`Deployment.gating` / `.expert_actors` / `.kv_shards` keep the raw Ray handles; `handle.actor` is that handle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Sequence
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from moeray.common.errors import ActorError, ActorGoneError, ActorTimeoutError, ActorTransientError
from moeray.common.sampling import SamplingParams, StepDelta

T = TypeVar("T")

# Everything a Ray call can raise because of the actor rather than the request (catch these, then `classify`).
RAY_CALL_ERRORS: tuple[type[BaseException], ...] = (RayActorError, TimeoutError, ActorError)


_WHAT = {ActorGoneError: "died", ActorTransientError: "is unreachable for now",
         ActorTimeoutError: "did not answer in time"}


def classify(error: BaseException) -> type[ActorError] | None:
    """The `common.errors` type a Ray call error stands for; None for an error the actor raised on purpose."""
    if isinstance(error, ActorError):
        return type(error)
    if isinstance(error, ActorUnavailableError):  # a subclass of RayActorError: test it first
        return ActorTransientError
    if isinstance(error, RayActorError):
        return ActorGoneError
    if isinstance(error, TimeoutError):  # GetTimeoutError, concurrent.futures / asyncio timeouts
        return ActorTimeoutError
    return None


def translate(error: BaseException, actor: str) -> BaseException:
    """`error` as a `common.errors` ActorError naming `actor`, or unchanged when `classify` says None."""
    kind = classify(error)
    if kind is None or isinstance(error, ActorError):
        return error
    text = str(error).strip()
    detail = text.splitlines()[0][:300] if text else type(error).__name__
    return kind(f"{actor} {_WHAT[kind]} ({detail})", actor)


class Reply(Generic[T]):
    """An actor call in flight. `await reply` or `reply.result(timeout_s)`; both translate Ray errors."""

    __slots__ = ("ref", "actor")

    def __init__(self, ref: ray.ObjectRef, actor: str) -> None:
        self.ref, self.actor = ref, actor

    def result(self, timeout_s: float | None = None) -> T:
        """Block for the answer (never from inside an event loop: await the reply there)."""
        try:
            return ray.get(self.ref, timeout=timeout_s)
        except RAY_CALL_ERRORS as e:
            raise translate(e, self.actor) from e

    async def wait(self, timeout_s: float | None = None) -> T:
        """Await the answer, giving up with ActorTimeoutError after timeout_s."""
        try:
            if timeout_s is None:
                return await self.ref
            return await asyncio.wait_for(asyncio.wrap_future(self.ref.future()), timeout_s)
        except RAY_CALL_ERRORS as e:
            raise translate(e, self.actor) from e

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait().__await__()

    def future(self):
        """A concurrent.futures.Future of the raw answer (for threads that poll many calls); its errors are
        Ray's: pass them through `translate`."""
        return self.ref.future()


def results(replies: Sequence[Reply[T]], timeout_s: float | None = None) -> list[T]:
    """Block for every reply (one deadline for all); the first failure is raised, translated."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    return [r.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for r in replies]


def named_actor(name: str, namespace: str, default: Any = None) -> Any:
    """The actor registered under `name` now (alive, or being restarted by Ray), else `default`."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return default


def actor_exists(name: str, namespace: str) -> bool:
    """True while a named actor is alive or being restarted by Ray (its name is held); False once gone for good."""
    return named_actor(name, namespace) is not None


def constructor_pid(actor: Any) -> int:
    """The pid of the process running `actor`'s constructor (a first start or a restart, as Ray's actor table
    says); 0 when it is not in its constructor: alive, dead, still waiting for a node, or unknown."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())  # GCS, no dashboard needed
    except Exception:  # noqa: BLE001 - no answer is no evidence of a hang
        return 0
    return int(info.get("Pid") or 0) if info.get("State") in ("PENDING_CREATION", "RESTARTING") else 0


def kill(actor: Any, restart: bool = False) -> None:
    """Kill for good (no restart); an actor that is already gone is fine. `restart`: kill a hung actor so that Ray
    restarts it (one of its max_restarts; once they are spent Ray reports it gone for good and the controller
    replaces it). SIGKILL reaches a stopped process too."""
    try:
        ray.kill(actor, no_restart=not restart)
    except Exception:  # noqa: BLE001 - already gone, or never started
        pass


class _Handle:
    role = "actor"

    def __init__(self, actor: Any, name: str | int = "") -> None:
        self.actor = actor  # the Ray actor handle
        self.name = f"{self.role} {name}".strip()

    def _call(self, method: str, *args: Any) -> Reply:
        return Reply(getattr(self.actor, method).remote(*args), self.name)

    def ping(self) -> Reply:
        """Answered in the actor's own "health" concurrency group, so a busy actor still answers."""
        return self._call("ping")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class GatingHandle(_Handle):
    role = "gating actor"

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               output_ids: list[int] | None = None) -> Reply[None]:
        """Queue a request (`output_ids`: tokens another gating actor already produced for it). The reply raises
        RequestError for a request that can never be served, DuplicateRequestError when the id is in use."""
        return self._call("submit", request_id, list(prompt_ids), params, list(output_ids or []))

    def poll(self, request_ids: list[str], timeout_s: float = 1.0) -> Reply[dict[str, list[StepDelta]]]:
        return self._call("poll", list(request_ids), timeout_s)

    def cancel(self, request_id: str) -> Reply[bool]:
        return self._call("cancel", request_id)

    def status(self) -> Reply[dict[str, Any]]:
        return self._call("status")

    def num_free_blocks(self) -> Reply[int]:
        return self._call("num_free_blocks")

    def set_table(self, table: dict[str, Any], expert_actors: dict[int, Any] | None = None) -> Reply[int]:
        return self._call("set_table", table, expert_actors)

    def set_kv_shards(self, shards: dict[str, Any]) -> Reply[int]:
        return self._call("set_kv_shards", shards)

    def flush_kv(self) -> Reply[int]:
        return self._call("flush_kv")

    def acked_keys(self) -> Reply[list[bytes]]:
        return self._call("acked_keys")

    def take_expert_load(self) -> Reply[dict[int, list[int]]]:
        return self._call("take_expert_load")


class ExpertHandle(_Handle):
    role = "expert actor"

    def forward(self, layer: int, x: Any, meta: Any) -> Reply[Any]:
        """x [M, D] rows, meta [3, P] (pair rows, expert ids, gate weights; engine/wire.py) -> [M, D] weighted
        expert outputs. The engine's step thread calls experts through actors/transport.py, which waits on many
        calls at once (`Reply.future()`) and classifies their errors with `classify`."""
        return self._call("forward", layer, x, meta)

    def forward_tensor(self, layer: int, x_ref: Any, meta: Any, tensor_transport: str) -> Reply[Any]:
        """The same call over Ray Direct Transport (actors/rdt.py): `x_ref` an RDT ref of the rows; the answer is
        `[ref]`, an RDT ref the actor put of its output (pulled by `ray.get(ref)`)."""
        return self._call("forward_tensor", layer, x_ref, meta, tensor_transport)

    def channel_address(self) -> Reply[dict[str, Any]]:
        """Where the actor's expert-call channel listens, with its token (engine/channel.py; the socket transport,
        actors/channel.py). Answered in the health group: also that transport's probe."""
        return self._call("channel_address")

    def load_slots(self, slots: dict[int, list[int]]) -> Reply[dict[int, list[int]]]:
        return self._call("load_slots", slots)

    def unload_slots(self, slots: dict[int, list[int]]) -> Reply[dict[int, list[int]]]:
        return self._call("unload_slots", slots)

    def loaded(self) -> Reply[dict[int, list[int]]]:
        return self._call("loaded")

    def stats(self) -> Reply[dict[str, Any]]:
        return self._call("stats")


class KVShardHandle(_Handle):
    role = "KV shard"

    def put(self, key: bytes, value: Any) -> Reply[bool]:
        """`value`: bytes, or an ObjectRef of them (one object-store copy shared by the replicas' writes)."""
        return self._call("put", key, value)

    def get(self, key: bytes) -> Reply[bytes | None]:
        return self._call("get", key)

    def get_many(self, keys: list[bytes]) -> Reply[list[bytes | None]]:
        return self._call("get_many", list(keys))

    def contains(self, keys: list[bytes]) -> Reply[list[bool]]:
        return self._call("contains", list(keys))

    def keys(self) -> Reply[list[bytes]]:
        return self._call("keys")

    def stats(self) -> Reply[dict[str, Any]]:
        return self._call("stats")


class ControllerHandle(_Handle):
    role = "controller"

    def start(self) -> Reply[int]:
        return self._call("start")

    def status(self) -> Reply[dict[str, Any]]:
        return self._call("status")

    def get_table(self) -> Reply[dict[str, Any]]:
        return self._call("get_table")

    def routing(self) -> Reply[dict[str, Any]]:
        """{"table": the active table, "actors": expert handles it routes to, "kv_shards": shard handles}."""
        return self._call("routing")

    def reconcile(self) -> Reply[dict[str, Any]]:
        return self._call("reconcile")

    def scale(self, group: int, replicas: int) -> Reply[dict[str, Any]]:
        return self._call("scale", group, replicas)

    def drain(self, actor_id: int) -> Reply[dict[str, Any]]:
        return self._call("drain", actor_id)

    def rebalance(self, num_redundant: int | None = None) -> Reply[dict[str, Any]]:
        return self._call("rebalance", num_redundant)

    def imbalance(self) -> Reply[float]:
        return self._call("imbalance")

    def metrics_snapshot(self) -> Reply[dict[str, Any]]:
        return self._call("metrics_snapshot")
