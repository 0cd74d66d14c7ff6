"""Overload at 2x the admission limit over the real engine: the excess is refused (gRPC RESOURCE_EXHAUSTED, HTTP
429 in OpenAI's error shape), every admitted request finishes with exactly max_tokens tokens, the server keeps
serving afterwards.

Needs the module-scoped `real_backends` fixture (tests/e2e/conftest.py). One `Frontend` serves both gRPC and HTTP,
so the bound is shared: LIMIT requests are offered on each, 2 x LIMIT in all, released together by a barrier.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.waiting import wait_until

from moeray.actors.frontend import FrontendConfig, serve_frontend
from moeray.actors.http import serve_http
from moeray.clients.client import MoerayClient, ServerBusyError

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
LIMIT = 3
MAX_TOKENS = 96  # an admitted request keeps its slot for ~MAX_TOKENS engine steps, long after the excess arrived


@pytest.fixture(scope="module")
def servers(loop_thread, real_backends):
    grpc_server, grpc_port = loop_thread.run(serve_frontend(real_backends, "127.0.0.1", 0,
                                                            config=FrontendConfig(max_in_flight=LIMIT)))
    http_server, http_port = loop_thread.run(serve_http(real_backends, frontend=grpc_server.frontend))
    yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", grpc_server.frontend
    loop_thread.run(http_server.stop(0))
    loop_thread.run(grpc_server.stop(0))


def _offer(grpc_address: str, http_url: str, per_protocol: int, max_tokens: int) -> list[tuple[str, str, object]]:
    """per_protocol requests on each protocol at once; (protocol, "ok" | "refused" | "error", detail) each."""
    barrier = threading.Barrier(2 * per_protocol)
    clients = [MoerayClient(grpc_address, token="") for _ in range(per_protocol)]
    https = [httpx.Client(base_url=http_url, timeout=120) for _ in range(per_protocol)]
    for c in clients:
        c.server_info()  # connected before the barrier, so the requests arrive together
    for h in https:
        h.get("/health")

    def grpc_call(c: MoerayClient):
        barrier.wait()
        try:
            return "grpc", "ok", c.complete(PROMPT, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        except ServerBusyError as e:
            return "grpc", "refused", e
        except Exception as e:  # noqa: BLE001 - anything else is a failure the caller reports
            return "grpc", "error", e

    def http_call(h: httpx.Client):
        barrier.wait()
        r = h.post("/v1/completions", json={"model": "", "prompt": PROMPT, "max_tokens": max_tokens,
                                            "ignore_eos": True, "temperature": 0.0})
        return "http", {200: "ok", 429: "refused"}.get(r.status_code, "error"), r

    try:
        with ThreadPoolExecutor(2 * per_protocol) as pool:
            futures = [pool.submit(grpc_call, c) for c in clients] + [pool.submit(http_call, h) for h in https]
            return [f.result(timeout=120) for f in futures]
    finally:
        for c in clients:
            c.close()
        for h in https:
            h.close()


def test_twice_the_limit_refuses_the_excess_and_loses_nothing(servers, real_backends):
    grpc_address, http_url, frontend = servers
    results = _offer(grpc_address, http_url, LIMIT, MAX_TOKENS)
    errors = [(p, d) for p, kind, d in results if kind == "error"]
    assert not errors, f"neither completed nor refused: {errors}"
    accepted = [(p, d) for p, kind, d in results if kind == "ok"]
    refused = [(p, d) for p, kind, d in results if kind == "refused"]
    assert len(accepted) == LIMIT and len(refused) == LIMIT, (len(accepted), len(refused))
    for protocol, answer in accepted:  # none lost, none cut short
        if protocol == "grpc":
            assert len(answer.token_ids) == MAX_TOKENS and answer.finish_reason == "length"
            assert answer.usage.completion_tokens == MAX_TOKENS
        else:
            body = answer.json()
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
            assert body["choices"][0]["finish_reason"] == "length"
    for protocol, answer in refused:
        if protocol == "grpc":
            assert "busy" in str(answer)
        else:
            error = answer.json()["error"]  # OpenAI's shape
            assert error["type"] == "rate_limit_error" and error["code"] == "server_busy"
            assert set(error) == {"message", "type", "param", "code"} and "busy" in error["message"]
    wait_until(lambda: frontend.admission.num_in_flight == 0 and all(b.load() == 0 for b in real_backends),
               what="the admitted requests to leave the front end and the engine")
    # still serving, on both protocols, up to the limit again
    again = _offer(grpc_address, http_url, 1, 4)
    assert [kind for _, kind, _ in again] == ["ok", "ok"], again
    assert len(again[0][2].token_ids) == 4 and again[1][2].json()["usage"]["completion_tokens"] == 4
