"""schemathesis against /openapi.json over a real deployment: no 5xx, every 4xx in OpenAI's error shape, the
server alive afterwards. Bounded: a fixed number of generated examples per operation (SCHEMATHESIS_EXAMPLES)."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from moeray.actors.frontend import FrontendConfig
from moeray.actors.http import serve_http

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def http_url(loop_thread, real_backends):
    server, port = loop_thread.run(serve_http(real_backends, "127.0.0.1", 0, FrontendConfig()))
    yield f"http://127.0.0.1:{port}"
    loop_thread.run(server.stop(0))


def test_no_5xx_and_openai_shaped_errors(http_url):
    schema = schemathesis.openapi.from_url(f"{http_url}/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], derandomize=True, database=None)
        def check(case):
            response = case.call(base_url=http_url, timeout=120)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, (case.path, response.text[:500])
                assert isinstance(error["message"], str) and error["message"]

        check()
        checked.append(operation.label)
    assert len(checked) >= 9, checked


def test_server_alive_afterwards(http_url):
    assert httpx.get(f"{http_url}/health", timeout=10).json() == {"status": "ok"}
    r = httpx.post(f"{http_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
