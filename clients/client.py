"""Python clients for a moeray server: `MoerayClient` (blocking) and `AsyncMoerayClient` (asyncio).

    from moeray.clients.client import MoerayClient
    with MoerayClient("localhost:50051") as client:
        for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0.0):
            print(chunk.text, end="", flush=True)

Calls that find no server retry with exponential backoff, then raise ServerUnavailableError (a
ConnectionError) naming the address, within `retry_timeout_s` (10 s by default). A stream is retried only
if it failed before its first message, so no text is ever delivered twice. Needs grpcio and protobuf only.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeray.clients.messages import (
    ActorStatus,
    AdminResult,
    AuthenticationError,
    ClusterStatus,
    Completion,
    DeadlineExceededError,
    GenerateChunk,
    InvalidRequestError,
    Metric,
    ModelInfo,
    MoerayClientError,
    ServerBusyError,
    ServerInfo,
    ServerUnavailableError,
    Usage,
    admin_from_proto,
    build_request,
    chunk_from_proto,
    completion_from_proto,
    metrics_from_proto,
    models_from_proto,
    server_info_from_proto,
    status_from_proto,
    translate_error,
    unreachable,
)
from moeray.clients.proto import moeray_pb2 as pb
from moeray.clients.proto import moeray_pb2_grpc as pb_grpc

DEFAULT_PORT = 50051
TOKEN_ENV = "MOERAY_TOKEN"
ADMIN_TOKEN_ENV = "MOERAY_ADMIN_TOKEN"
LOOPBACK_HOSTS = ("localhost", "::1")
CHANNEL_OPTIONS = [
    # Reconnect soon after a refused connection, so a server that comes back is found within the retry budget.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter on UNAVAILABLE, giving up after timeout_s in all."""

    timeout_s: float = 10.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.multiplier, self.max_backoff_s)


def normalize_address(address: str) -> str:
    """ "host" -> "host:50051"; "host:port" and "[v6]:port" unchanged."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


def is_loopback(address: str) -> bool:
    """True for an address on this machine (localhost, 127.0.0.0/8, ::1, a unix socket)."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if not address.startswith("[") else address[1:address.index("]")]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _credentials(tls: bool, root_certificates: str | Path | bytes | None) -> grpc.ChannelCredentials | None:
    if root_certificates is None and not tls:
        return None
    if isinstance(root_certificates, str | Path):
        root_certificates = Path(root_certificates).expanduser().read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _options(tls_server_name: str | None) -> list[tuple[str, object]]:
    if tls_server_name:
        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls_server_name)]
    return list(CHANNEL_OPTIONS)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class _ClientBase:
    """Connection settings shared by both clients."""

    def __init__(
        self,
        address: str = f"localhost:{DEFAULT_PORT}",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        retry: RetryPolicy | None = None,
        admin_token: str | None = None,
        allow_plaintext_token: bool = False,
    ) -> None:
        """token defaults to $MOERAY_TOKEN, admin_token (sent with scale / drain / rebalance / status / metrics) to
        $MOERAY_ADMIN_TOKEN; root_certificates (a PEM path or bytes) turns TLS on, as does tls (then the
        system's roots verify the server); tls_server_name overrides the name checked in its cert. A token is
        never sent in plaintext to another machine unless allow_plaintext_token is set."""
        self.address = normalize_address(address)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        admin_token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None
        self._credentials = _credentials(tls, root_certificates)
        if (token or admin_token) and self._credentials is None and not allow_plaintext_token \
                and not is_loopback(self.address):
            raise ValueError(f"refusing to send a bearer token in plaintext to {self.address}: use TLS (tls=True or "
                             "root_certificates; --tls / --tls-ca) or, on a trusted network, allow_plaintext_token="
                             "True (--insecure)")
        self._metadata = _metadata(token)
        self._admin_metadata = _metadata(admin_token or token)
        self._options = _options(tls_server_name)
        self._retry = retry or RetryPolicy()


class MoerayClient(_ClientBase):
    """Blocking client; safe to share between threads. Use as a context manager or call close()."""

    def __init__(self, address: str = f"localhost:{DEFAULT_PORT}", **kwargs) -> None:
        super().__init__(address, **kwargs)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.address, options=self._options)
        else:
            self._channel = grpc.secure_channel(self.address, self._credentials, options=self._options)
        self._stub = pb_grpc.MoerayStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._connected = False  # a server answered since the last UNAVAILABLE

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MoerayClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing

    def _wait_ready(self, start_s: float, last: str | None) -> None:
        """Block until a server answers, or raise ServerUnavailableError when the retry budget is spent.

        Probes with a health check that waits for the connection (no deadline is put on the real call, which
        may stream for minutes). Channel-state subscriptions would do too, but their polling threads race
        with close().
        """
        if self._connected:
            return
        remaining = self._retry.timeout_s - (time.monotonic() - start_s)
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=max(remaining, 0.01), wait_for_ready=True)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                reason = e.details() if e.code() == grpc.StatusCode.UNAVAILABLE else None
                raise unreachable(self.address, time.monotonic() - start_s, last or reason) from None
            # any other answer (e.g. UNIMPLEMENTED) still means a server is there
        self._connected = True

    def _unary(self, method, request, timeout_s: float | None = None, admin: bool = False):
        start_s, last = time.monotonic(), None
        for delay in self._retry.delays():
            self._wait_ready(start_s, last)
            try:
                return method(request, timeout=timeout_s, metadata=self._admin_metadata if admin else self._metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate_error(e, self.address) from e
                last, self._connected = e.details(), False
            if time.monotonic() + delay - start_s >= self._retry.timeout_s:
                raise unreachable(self.address, time.monotonic() - start_s, last)
            time.sleep(delay)

    # -- generation

    def generate(
        self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **params
    ) -> Iterator[GenerateChunk]:
        """Stream a completion chunk by chunk; params as in `build_request`. Leaving the loop early cancels
        the request on the server."""
        request = build_request(prompt, **params)
        start_s, last = time.monotonic(), None
        for delay in self._retry.delays():
            self._wait_ready(start_s, last)
            call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as e:
                if received or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate_error(e, self.address) from e
                last, self._connected = e.details(), False
            finally:
                call.cancel()  # no-op when finished; stops the server's work when the caller left early
            if time.monotonic() + delay - start_s >= self._retry.timeout_s:
                raise unreachable(self.address, time.monotonic() - start_s, last)
            time.sleep(delay)

    def complete(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **params) -> Completion:
        """The whole completion in one call; params as in `build_request`."""
        return completion_from_proto(self._unary(self._stub.Complete, build_request(prompt, **params), timeout_s))

    # -- information

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name, e.g. "SERVING"."""
        reply = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def list_models(self) -> list[ModelInfo]:
        return models_from_proto(self._unary(self._stub.ListModels, pb.ListModelsRequest()).models)

    def server_info(self) -> ServerInfo:
        return server_info_from_proto(self._unary(self._stub.ServerInfo, pb.ServerInfoRequest()))

    # -- administration

    def status(self) -> ClusterStatus:
        return status_from_proto(self._unary(self._admin.Status, pb.StatusRequest(), admin=True))

    def scale(self, group: str, replicas: int) -> AdminResult:
        request = pb.ScaleRequest(group=group, replicas=replicas)
        return admin_from_proto(self._unary(self._admin.Scale, request, admin=True))

    def drain(self, actor: str) -> AdminResult:
        return admin_from_proto(self._unary(self._admin.Drain, pb.DrainRequest(actor=actor), admin=True))

    def rebalance(self) -> AdminResult:
        return admin_from_proto(self._unary(self._admin.Rebalance, pb.RebalanceRequest(), admin=True))

    def metrics(self) -> list[Metric]:
        return metrics_from_proto(self._unary(self._admin.Metrics, pb.MetricsRequest(), admin=True))


class AsyncMoerayClient(_ClientBase):
    """asyncio client; create and use it inside one event loop. `async with` or `await close()`."""

    def __init__(self, address: str = f"localhost:{DEFAULT_PORT}", **kwargs) -> None:
        super().__init__(address, **kwargs)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
        self._stub = pb_grpc.MoerayStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMoerayClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _wait_ready(self, start_s: float, last: str | None) -> None:
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        remaining = self._retry.timeout_s - (time.monotonic() - start_s)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise unreachable(self.address, time.monotonic() - start_s, last) from None

    async def _unary(self, method, request, timeout_s: float | None = None, admin: bool = False):
        start_s, last = time.monotonic(), None
        for delay in self._retry.delays():
            await self._wait_ready(start_s, last)
            try:
                metadata = self._admin_metadata if admin else self._metadata
                return await method(request, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate_error(e, self.address) from e
                last = e.details()
            if time.monotonic() + delay - start_s >= self._retry.timeout_s:
                raise unreachable(self.address, time.monotonic() - start_s, last)
            await asyncio.sleep(delay)

    async def generate(
        self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **params
    ) -> AsyncIterator[GenerateChunk]:
        """Stream a completion chunk by chunk (`async for`); leaving early cancels the server's work."""
        request = build_request(prompt, **params)
        start_s, last = time.monotonic(), None
        for delay in self._retry.delays():
            await self._wait_ready(start_s, last)
            call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as e:
                if received or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate_error(e, self.address) from e
                last = e.details()
            finally:
                call.cancel()
            if time.monotonic() + delay - start_s >= self._retry.timeout_s:
                raise unreachable(self.address, time.monotonic() - start_s, last)
            await asyncio.sleep(delay)

    async def complete(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **params) -> Completion:
        reply = await self._unary(self._stub.Complete, build_request(prompt, **params), timeout_s)
        return completion_from_proto(reply)

    async def health(self, service: str = "") -> str:
        reply = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def list_models(self) -> list[ModelInfo]:
        return models_from_proto((await self._unary(self._stub.ListModels, pb.ListModelsRequest())).models)

    async def server_info(self) -> ServerInfo:
        return server_info_from_proto(await self._unary(self._stub.ServerInfo, pb.ServerInfoRequest()))

    async def status(self) -> ClusterStatus:
        return status_from_proto(await self._unary(self._admin.Status, pb.StatusRequest(), admin=True))

    async def scale(self, group: str, replicas: int) -> AdminResult:
        reply = await self._unary(self._admin.Scale, pb.ScaleRequest(group=group, replicas=replicas), admin=True)
        return admin_from_proto(reply)

    async def drain(self, actor: str) -> AdminResult:
        return admin_from_proto(await self._unary(self._admin.Drain, pb.DrainRequest(actor=actor), admin=True))

    async def rebalance(self) -> AdminResult:
        return admin_from_proto(await self._unary(self._admin.Rebalance, pb.RebalanceRequest(), admin=True))

    async def metrics(self) -> list[Metric]:
        return metrics_from_proto(await self._unary(self._admin.Metrics, pb.MetricsRequest(), admin=True))


__all__ = [
    "ActorStatus",
    "AdminResult",
    "AsyncMoerayClient",
    "AuthenticationError",
    "ClusterStatus",
    "Completion",
    "DeadlineExceededError",
    "GenerateChunk",
    "InvalidRequestError",
    "Metric",
    "ModelInfo",
    "MoerayClient",
    "MoerayClientError",
    "RetryPolicy",
    "ServerBusyError",
    "ServerInfo",
    "ServerUnavailableError",
    "Usage",
]
