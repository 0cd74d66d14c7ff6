"""The gRPC front end over the real engine: streaming, concurrency, validation, cancellation, overload, auth.

Needs a module- or session-scoped fixture `real_backends` (tests/e2e/conftest.py): a list of
actors/frontend_backend.Backend over a real engine, all serving the same model. The front end runs on its own event
loop in a background thread (one per module), and the backends are only ever called from that loop, so they
may hold asyncio objects bound to it. If a backend has `num_free_blocks()`, the cancellation tests also check
that every block comes back.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.loop import LoopThread
from support.waiting import wait_until

from moeray.actors.frontend import FrontendConfig, serve_frontend
from moeray.clients.client import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    MoerayClient,
    RetryPolicy,
    ServerBusyError,
    ServerUnavailableError,
)
from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.sampling import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
TOKEN = "e2e-secret-token"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: a front end on a background event loop


class Frontend:
    def __init__(self, loop: LoopThread, server, port: int) -> None:
        self.loop, self.server, self.port = loop, server, port
        self.address = f"127.0.0.1:{port}"

    def client(self, **kwargs) -> MoerayClient:
        kwargs.setdefault("token", "")  # never pick up $MOERAY_TOKEN by accident
        return MoerayClient(self.address, **kwargs)

    def stop(self, grace_s: float = 0.0) -> None:
        self.loop.run(self.server.stop(grace_s))


@pytest.fixture(scope="module")
def start_frontend(loop_thread, real_backends):
    """Factory: start a front end over the real backends with the given FrontendConfig fields."""
    started: list[Frontend] = []

    def start(**config) -> Frontend:
        server, port = loop_thread.run(serve_frontend(real_backends, "127.0.0.1", 0, config=FrontendConfig(**config)))
        started.append(Frontend(loop_thread, server, port))
        return started[-1]

    yield start
    for frontend in started:
        frontend.stop()


@pytest.fixture(scope="module")
def frontend(start_frontend) -> Frontend:
    return start_frontend()


@pytest.fixture(scope="module")
def client(frontend):
    with frontend.client() as c:
        yield c


@pytest.fixture(scope="module")
def backend(real_backends):
    return real_backends[0]


def run_backend(loop_thread, backend, request_id: str, prompt_ids: list[int], params: SamplingParams):
    """The backend's own answer: (token ids, finish reason), run on the front end's loop."""

    async def collect():
        ids, finish = [], None
        stream = backend.generate(request_id, prompt_ids, params)
        if asyncio.iscoroutine(stream):
            stream = await stream
        async for delta in stream:
            ids.extend(delta.token_ids)
            finish = delta.finish_reason
        return ids, finish

    return loop_thread.run(collect())


def long_generation(backend) -> dict:
    """Parameters that keep a request generating for seconds at least."""
    prompt_len = len(backend.tokenize(PROMPT))
    max_tokens = min(backend.max_context - prompt_len - 1, 1024)
    return {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture
def cancel_spy(real_backends, monkeypatch):
    """Records the request ids the front end cancels, still calling each backend's real cancel."""
    cancelled: list[str] = []
    for b in real_backends:
        real_cancel = b.cancel

        async def spy(request_id, _real=real_cancel):
            cancelled.append(request_id)
            await _real(request_id)

        try:
            monkeypatch.setattr(b, "cancel", spy)
        except (AttributeError, TypeError):
            pytest.skip(f"cannot observe {type(b).__name__}.cancel")
    return cancelled


def free_blocks(real_backends) -> list[int] | None:
    if not all(hasattr(b, "num_free_blocks") for b in real_backends):
        return None
    return [b.num_free_blocks() for b in real_backends]


def all_idle(real_backends) -> bool:
    return all(b.load() == 0 for b in real_backends)


# ---------------------------------------------------------------------------------------------------------
# Serving basics


def test_health_is_serving(frontend, client):
    assert client.health() == "SERVING"
    with grpc.insecure_channel(frontend.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ["", "moeray.v1.Moeray", "moeray.v1.Admin"]:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(frontend):
    with grpc.insecure_channel(frontend.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"moeray.v1.Moeray", "moeray.v1.Admin", "grpc.health.v1.Health"} <= names


def test_list_models_and_server_info(client, real_backends):
    models = client.list_models()
    assert [m.name for m in models] == [real_backends[0].model_name]
    assert models[0].max_context == real_backends[0].max_context
    info = client.server_info()
    assert info.num_backends == len(real_backends) and not info.auth_required


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (0.8, 1234)], ids=["greedy", "sampled"])
def test_stream_equals_the_backends_own_generate(client, backend, loop_thread, temperature, seed):
    params = SamplingParams(max_tokens=16, temperature=temperature, seed=seed, ignore_eos=True)
    want_ids, want_finish = run_backend(loop_thread, backend, f"direct-{temperature}", backend.tokenize(PROMPT), params)

    chunks = list(client.generate(PROMPT, max_tokens=16, temperature=temperature, seed=seed, ignore_eos=True))
    got_ids = [t for c in chunks for t in c.token_ids]
    assert got_ids == want_ids
    assert chunks[-1].finish_reason == want_finish == "length"
    assert "".join(c.text for c in chunks) == backend.detokenize(want_ids)
    assert chunks[-1].usage.completion_tokens == len(want_ids)
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_complete_equals_the_stream(client):
    params = {"max_tokens": 12, "temperature": 0.7, "seed": 7}
    chunks = list(client.generate(PROMPT, **params))
    completion = client.complete(PROMPT, **params)
    assert completion.token_ids == [t for c in chunks for t in c.token_ids]
    assert completion.text == "".join(c.text for c in chunks)
    assert completion.finish_reason == chunks[-1].finish_reason


def test_text_deltas_never_split_a_character(client, backend):
    chunks = list(client.generate(PROMPT, max_tokens=32, temperature=1.0, seed=99))
    full = backend.detokenize([t for c in chunks for t in c.token_ids])
    if "\ufffd" not in full:
        assert all("\ufffd" not in c.text for c in chunks)


def test_token_ids_prompt_works_like_text(client, backend):
    by_text = client.complete(PROMPT, max_tokens=8, temperature=0.0)
    by_ids = client.complete(backend.tokenize(PROMPT), max_tokens=8, temperature=0.0)
    assert by_ids.token_ids == by_text.token_ids


def test_logprobs_come_one_per_token(client):
    completion = client.complete(PROMPT, max_tokens=8, temperature=0.0, logprobs=True)
    assert len(completion.logprobs) == len(completion.token_ids)
    assert all(lp <= 0.0 for lp in completion.logprobs)


def test_stop_string_cuts_the_text(client):
    greedy = client.complete(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True).text
    if len(greedy.strip()) < 6:
        pytest.skip("the model's greedy output is too short to pick a stop string from")
    start = len(greedy) // 2
    stop = greedy[start : start + 3]
    got = client.complete(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    assert got.text == greedy[: greedy.index(stop)]
    assert got.finish_reason == "stop"


def test_32_concurrent_clients_complete(frontend, real_backends):
    def one(i: int):
        with frontend.client() as c:
            chunks = list(c.generate(f"{PROMPT} {i}", max_tokens=8, temperature=0.5, seed=i))
        return chunks[-1]

    with ThreadPoolExecutor(32) as pool:
        finals = list(pool.map(one, range(32)))
    assert all(f.finish_reason for f in finals)
    assert all(f.usage is not None and f.usage.completion_tokens >= 1 for f in finals)
    wait_until(lambda: all_idle(real_backends), what="backends to go idle")


# ---------------------------------------------------------------------------------------------------------
# Malformed requests


def _field(number: int, raw: bytes) -> bytes:
    return bytes([number << 3 | 2, len(raw)]) + raw


def malformed_requests(backend) -> list[tuple[str, bytes]]:
    """(field the error must name, serialized request) pairs, sized to the served model."""
    ctx, vocab = backend.max_context, backend.vocab_size
    r = pb.GenerateRequest
    cases = [
        ("prompt", r()),
        ("prompt", r(prompt="hi", prompt_token_ids=[1])),
        ("prompt", r(prompt=" ".join(["hello"] * (2 * ctx)))),
        ("prompt", r(prompt="x" * ((1 << 20) + 1))),
        ("prompt", r(prompt_token_ids=[1] * ctx, max_tokens=1)),
        ("prompt_token_ids", r(prompt_token_ids=[-1])),
        ("prompt_token_ids", r(prompt_token_ids=[vocab])),
        ("max_tokens", r(prompt="hi", max_tokens=0)),
        ("max_tokens", r(prompt="hi", max_tokens=-1)),
        ("max_tokens", r(prompt="hi", max_tokens=ctx)),
        ("max_tokens", r(prompt="hi", max_tokens=2**31 - 1)),
        ("max_tokens", r(prompt_token_ids=[1] * (ctx - 1), max_tokens=2)),
        ("temperature", r(prompt="hi", temperature=-1.0)),
        ("temperature", r(prompt="hi", temperature=math.nan)),
        ("temperature", r(prompt="hi", temperature=math.inf)),
        ("top_p", r(prompt="hi", top_p=0.0)),
        ("top_p", r(prompt="hi", top_p=1.5)),
        ("top_p", r(prompt="hi", top_p=-0.5)),
        ("top_p", r(prompt="hi", top_p=math.nan)),
        ("top_k", r(prompt="hi", top_k=-1)),
        ("stop", r(prompt="hi", stop=[""])),
        ("stop", r(prompt="hi", stop=["x" * 300])),
        ("stop", r(prompt="hi", stop=["a"] * 17)),
        ("stop_token_ids", r(prompt="hi", stop_token_ids=[-1])),
        ("stop_token_ids", r(prompt="hi", stop_token_ids=[vocab])),
        ("model", r(prompt="hi", model="no-such-model")),
        ("request_id", r(prompt="hi", request_id="x" * 200)),
        ("request_id", r(prompt="hi", request_id="a\nb")),
    ]
    raw = [
        ("prompt", _field(2, b"\xff\xfe")),
        ("stop[1]", _field(2, b"hi") + _field(9, b"ok") + _field(9, b"\xc3")),
        ("model", _field(2, b"hi") + _field(1, b"\x80")),
        ("request_id", _field(2, b"hi") + _field(13, b"\xe2\x82")),
        ("request", b"\xff\xff\xff\xff"),
    ]
    return [(f, m.SerializeToString()) for f, m in cases] + raw


def call_raw(channel: grpc.Channel, method: str, data: bytes, timeout_s: float = 30.0):
    identity = lambda b: b  # noqa: E731
    if method == "Generate":
        call = channel.unary_stream("/moeray.v1.Moeray/Generate", request_serializer=identity)
        return list(call(data, timeout=timeout_s))
    call = channel.unary_unary("/moeray.v1.Moeray/Complete", request_serializer=identity)
    return call(data, timeout=timeout_s)


def test_table_has_at_least_30_cases(backend):
    assert len(malformed_requests(backend)) >= 30


@pytest.mark.parametrize("method", ["Generate", "Complete"])
def test_malformed_requests_get_invalid_argument_and_the_server_keeps_serving(frontend, client, backend, method):
    failures = []
    with grpc.insecure_channel(frontend.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        for field, data in malformed_requests(backend):
            try:
                call_raw(channel, method, data)
                failures.append(f"{field}: accepted")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT or field not in (e.details() or ""):
                    failures.append(f"{field}: {e.code().name} {e.details()!r}")
    assert not failures, "\n".join(failures)
    assert client.complete(PROMPT, max_tokens=4).finish_reason


FUZZ_FIELDS = {
    "max_tokens": st.integers(-(2**31), 0),
    "temperature": st.floats(max_value=-1e-6) | st.just(math.nan) | st.just(-math.inf),
    "top_p": st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True),
    "top_k": st.integers(-(2**31), -1),
    "stop": st.lists(st.just(""), min_size=1, max_size=2),
    "request_id": st.text(min_size=129, max_size=200),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FUZZ_FIELDS)), data=st.data())
def test_fuzz_invalid_fields_get_invalid_argument(frontend, field, data):
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=2)
    value = data.draw(FUZZ_FIELDS[field])
    if isinstance(value, list):
        getattr(request, field).extend(value)
    else:
        setattr(request, field, value)
    with grpc.insecure_channel(frontend.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call_raw(channel, "Complete", request.SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_client_gets_a_typed_error_naming_the_field(client):
    with pytest.raises(InvalidRequestError, match="temperature"):
        client.complete(PROMPT, temperature=-1.0)


def test_oversized_message_is_refused(start_frontend):
    small = start_frontend(max_message_bytes=64 << 10, max_prompt_bytes=32 << 10)
    with small.client() as c:
        with pytest.raises(ServerBusyError):  # gRPC's own limit answers RESOURCE_EXHAUSTED
            c.complete("x" * (128 << 10), max_tokens=1)
        with pytest.raises(InvalidRequestError, match="prompt"):  # ours, under gRPC's, names the field
            c.complete("x" * (48 << 10), max_tokens=1)
        assert c.complete(PROMPT, max_tokens=2).finish_reason


# ---------------------------------------------------------------------------------------------------------
# Cancellation, deadlines, overload


def test_disconnect_mid_stream_cancels_and_frees_blocks(frontend, backend, real_backends, cancel_spy):
    blocks_before = free_blocks(real_backends)
    with frontend.client() as c:
        stream = c.generate(PROMPT, request_id="disconnect-me", **long_generation(backend))
        next(stream)
        next(stream)
        stream.close()  # the client goes away mid-stream
    wait_until(lambda: any(rid.endswith("disconnect-me") for rid in cancel_spy), what="backend.cancel")
    wait_until(lambda: all_idle(real_backends), what="backends to go idle")
    if blocks_before is not None:
        wait_until(lambda: free_blocks(real_backends) == blocks_before, what="all KV blocks to be freed")


def test_deadline_cancels_the_request(frontend, backend, real_backends, cancel_spy):
    with frontend.client() as c:
        with pytest.raises(DeadlineExceededError):
            for _ in c.generate(PROMPT, request_id="too-slow", timeout_s=0.3, **long_generation(backend)):
                pass
    wait_until(lambda: any(rid.endswith("too-slow") for rid in cancel_spy), what="backend.cancel")
    wait_until(lambda: all_idle(real_backends), what="backends to go idle")


def test_full_queue_answers_resource_exhausted(start_frontend, backend, real_backends):
    busy = start_frontend(max_in_flight=2)
    with busy.client() as c1, busy.client() as c2, busy.client() as c3:
        holders = [c.generate(PROMPT, **long_generation(backend)) for c in (c1, c2)]
        for h in holders:
            next(h)  # both admitted and streaming
        with pytest.raises(ServerBusyError, match="busy"):
            c3.complete(PROMPT, max_tokens=2)
        for h in holders:
            h.close()
        wait_until(lambda: c3.server_info().num_in_flight == 0, what="the admitted requests to leave")
        assert c3.complete(PROMPT, max_tokens=2).finish_reason
    wait_until(lambda: all_idle(real_backends), what="backends to go idle")


def test_graceful_stop_lets_in_flight_requests_finish(start_frontend, loop_thread):
    stopping = start_frontend()
    with stopping.client(retry=RetryPolicy(timeout_s=1.0)) as c:
        stream = c.generate(PROMPT, max_tokens=8, temperature=0.0)
        first = next(stream)
        stop = asyncio.run_coroutine_threadsafe(stopping.server.stop(30.0), loop_thread.loop)
        rest = list(stream)
        assert (rest or [first])[-1].finish_reason
        stop.result(60)
        with pytest.raises(ServerUnavailableError):
            c.list_models()


# ---------------------------------------------------------------------------------------------------------
# Auth, TLS, admin


@pytest.fixture(scope="module")
def secured(start_frontend) -> Frontend:
    return start_frontend(auth_token=TOKEN)


@pytest.mark.parametrize("token", ["", "wrong-token"], ids=["missing", "wrong"])
def test_bad_token_is_unauthenticated(secured, token):
    with secured.client(token=token) as c:
        with pytest.raises(AuthenticationError):
            list(c.generate(PROMPT, max_tokens=2))
        with pytest.raises(AuthenticationError):
            c.complete(PROMPT, max_tokens=2)
        with pytest.raises(AuthenticationError):
            c.list_models()
        with pytest.raises(AuthenticationError):
            c.status()
        assert c.health() == "SERVING"  # probes need no token


def test_right_token_is_served(secured):
    with secured.client(token=TOKEN) as c:
        assert c.complete(PROMPT, max_tokens=2).finish_reason
        assert c.server_info().auth_required


def test_admin_status_answers(client):
    status = client.status()
    assert status.table_version >= 0
    assert status.actors, "the backend reports no actors"
    gating = [a for a in status.actors if a.kind == "gating"]
    assert gating and all(a.details["transport"] == "socket" for a in gating)  # tensor_transport auto on CPU
    experts = [a for a in status.actors if a.kind == "expert"]
    assert experts and all(int(a.details["weight_bytes"]) > 0 for a in experts)
    assert all(float(a.details["off_cpu_s"]) >= 0 for a in experts)


def test_status_command_prints_weights(frontend, capsys):
    from moeray.clients.cli import main

    assert main(["status", "--address", frontend.address]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("ACTOR"))
    assert "WEIGHTS" in header and "OFF-CPU S" in header
    assert "MiB" in out


def test_admin_metrics_answer(client):
    names = {m.name for m in client.metrics()}
    assert {"moeray_running", "moeray_free_blocks", "moeray_routing_table_version"} <= names


ADMIN_TOKEN = "admin-" + TOKEN


@pytest.fixture(scope="module")
def admin_secured(start_frontend) -> Frontend:
    return start_frontend(auth_token=TOKEN, admin_token=ADMIN_TOKEN)


def test_inference_token_cannot_change_the_deployment(admin_secured):
    with admin_secured.client(token=TOKEN) as c:
        assert c.complete(PROMPT, max_tokens=2).finish_reason  # it serves requests
        assert c.status().actors  # and may read the status
        with pytest.raises(AuthenticationError, match="PERMISSION_DENIED"):
            c.scale("0", 1)
        with pytest.raises(AuthenticationError, match="PERMISSION_DENIED"):
            c.rebalance()


def test_admin_token_operates(admin_secured):
    with admin_secured.client(token=TOKEN, admin_token=ADMIN_TOKEN) as c:
        result = c.scale("0", 1)  # pins group 0 at the one replica it has: nothing moves
        assert "group 0" in result.message


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(start_frontend, tmp_path):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    secure = start_frontend(tls_cert_path=cert, tls_key_path=key)
    with secure.client(root_certificates=cert) as c:
        assert c.list_models()
        assert c.server_info().tls
    with secure.client(retry=RetryPolicy(timeout_s=1.0)) as plain:
        with pytest.raises(ServerUnavailableError):
            plain.list_models()
