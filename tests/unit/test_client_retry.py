"""Client connection handling: fail fast and clearly on no server, find a server that comes up late."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moeray.clients.client import MoerayClient, RetryPolicy, normalize_address
from moeray.clients.messages import ServerUnavailableError, build_request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_within_the_retry_budget_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with MoerayClient(address, retry=RetryPolicy(timeout_s=1.0)) as client:
        with pytest.raises(ServerUnavailableError, match=address) as info:
            client.list_models()
    assert time.monotonic() - start < 3.0
    assert isinstance(info.value, ConnectionError)


def test_stream_to_unreachable_server_fails_too():
    address = f"127.0.0.1:{free_port()}"
    with MoerayClient(address, retry=RetryPolicy(timeout_s=0.5)) as client:
        with pytest.raises(ServerUnavailableError, match="cannot reach"):
            list(client.generate("hi"))


def test_server_that_starts_late_is_found():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    timer = threading.Timer(1.0, server.start)
    timer.start()
    try:
        with MoerayClient(f"127.0.0.1:{port}", retry=RetryPolicy(timeout_s=8.0)) as client:
            assert client.health() == "SERVING"
    finally:
        timer.join()
        server.stop(0)


def test_backoff_grows_to_its_cap():
    delays = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4).delays()
    got = [next(delays) for _ in range(6)]
    assert all(0.05 <= d <= 0.4 for d in got)
    assert max(got[3:]) > 0.1


@pytest.mark.parametrize(
    ("given", "expected"),
    [("host", "host:50051"), ("host:1", "host:1"), ("[::1]", "[::1]:50051"), ("[::1]:7", "[::1]:7")],
)
def test_address_gets_the_default_port(given, expected):
    assert normalize_address(given) == expected


def test_request_leaves_unset_parameters_to_the_server():
    request = build_request([1, 2], temperature=0.0, stop=["\n"])
    assert list(request.prompt_token_ids) == [1, 2]
    assert request.HasField("temperature") and not request.HasField("max_tokens")


def test_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOERAY_TOKEN", "abc")
    with MoerayClient("127.0.0.1:1") as client:
        assert client._metadata == (("authorization", "Bearer abc"),)
    assert health_pb2.HealthCheckResponse.SERVING  # the health proto ships with grpcio-health-checking


def test_async_client_fails_within_the_retry_budget_too():
    from moeray.clients.client import AsyncMoerayClient

    address = f"127.0.0.1:{free_port()}"

    async def call():
        async with AsyncMoerayClient(address, retry=RetryPolicy(timeout_s=1.0)) as client:
            with pytest.raises(ServerUnavailableError, match=address):
                await client.status()
            with pytest.raises(ServerUnavailableError):
                async for _ in client.generate("hi"):
                    pass

    start = time.monotonic()
    asyncio.run(call())
    assert time.monotonic() - start < 5.0
