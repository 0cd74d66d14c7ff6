"""The OpenAI-compatible HTTP API over a fake backend (no Ray, no torch): shapes, validation, auth, limits.

The server runs on its own event loop in a background thread; tests talk to it with httpx and the official
`openai` client, as users would.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from support.loop import LoopThread

from moeray.actors.frontend import Frontend, FrontendConfig
from moeray.actors.http import ChatTemplate, serve_http
from moeray.common.errors import BackendUnavailableError
from moeray.common.sampling import StepDelta

WORDS = "hello world, this is a fake model. "
EOS = 0
TOKEN = "unit-secret"


class FakeBackend:
    """Char-level (ids are code points < 256). Generates WORDS one character a step; a prompt ending in "!"
    gets EOS after 3 tokens unless ignore_eos. Records what it was asked and what was cancelled."""

    model_name, max_context, vocab_size = "fake", 128, 256

    def __init__(self, step_s: float = 0.0, fail: bool = False) -> None:
        self.step_s, self.fail = step_s, fail
        self.calls: list[tuple[list[int], object]] = []
        self.cancelled: list[str] = []
        self.active: set[str] = set()

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    async def generate(self, request_id, prompt_ids, params):
        if self.fail:
            raise BackendUnavailableError("fake backend is down")
        self.calls.append((list(prompt_ids), params))
        self.active.add(request_id)
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                eos = not params.ignore_eos and prompt_ids[-1] == ord("!") and i == 2
                finish = "eos" if eos else ("length" if i == params.max_tokens - 1 else None)
                token = EOS if eos else ord(WORDS[i % len(WORDS)])
                yield StepDelta(request_id, [token], [-0.5] if params.logprobs else None, finish)
                if finish:
                    return
        finally:
            self.active.discard(request_id)

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def status(self):
        return {}

    async def admin(self, op, **kwargs):
        raise NotImplementedError(op)

    def load(self) -> int:
        return len(self.active)


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread("http-api-loop", timeout_s=30.0)
    yield thread
    thread.close()


def http_servers(loop: LoopThread, make_backend):
    """Yields a factory of (backend, base url) of an HTTP API over a fresh `make_backend()` (or the given
    backend); stops every server it started when resumed. Shared by this module's and test_http_parity's fixture."""
    servers = []

    def start(backend=None, frontend: Frontend | None = None, **config):
        backend = backend or make_backend()
        server, port = loop.run(serve_http([backend], "127.0.0.1", 0, FrontendConfig(**config), frontend=frontend))
        servers.append(server)
        return backend, f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        loop.run(server.stop(0))


@pytest.fixture(scope="module")
def serve(loop):
    """Factory: (backend, base url) of an HTTP API over a fresh FakeBackend."""
    yield from http_servers(loop, FakeBackend)


@pytest.fixture(scope="module")
def api(serve):
    return serve()


def post(url: str, path: str, body, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def oai(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Answers


def test_completion_text_and_usage(api):
    backend, url = api
    got = oai(url).completions.create(model="fake", prompt="hi", max_tokens=5)
    assert got.choices[0].text == "hello"
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (2, 5, 7)


def test_token_id_prompt_reaches_the_backend_unchanged(api):
    backend, url = api
    post(url, "/v1/completions", {"model": "fake", "prompt": [104, 105, 33], "max_tokens": 2}).raise_for_status()
    assert backend.calls[-1][0] == [104, 105, 33]


def test_eos_finishes_as_stop(api):
    _, url = api
    got = oai(url).completions.create(model="fake", prompt="hey!", max_tokens=10)
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == "he"


def test_sampling_fields_reach_the_engine(api):
    backend, url = api
    body = {"model": "fake", "prompt": "hi", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 7,
            "stop": "xyz", "top_k": 4, "ignore_eos": True, "stop_token_ids": [5]}
    post(url, "/v1/completions", body).raise_for_status()
    params = backend.calls[-1][1]
    assert (params.temperature, params.top_p, params.seed, params.top_k) == (0.5, 0.9, 7, 4)
    assert params.stop == ["xyz"] and params.ignore_eos and params.stop_token_ids == [5]


def test_stop_string_cuts_the_text(api):
    _, url = api
    got = oai(url).completions.create(model="fake", prompt="hi", max_tokens=20, stop=[" wor"])
    assert got.choices[0].text == "hello"
    assert got.choices[0].finish_reason == "stop"


def test_completion_logprobs_one_per_token(api):
    _, url = api
    got = oai(url).completions.create(model="fake", prompt="hi", max_tokens=4, logprobs=0)
    lp = got.choices[0].logprobs
    assert lp.tokens == ["h", "e", "l", "l"] and lp.token_logprobs == [-0.5] * 4
    assert lp.text_offset == [0, 1, 2, 3]


def test_chat_uses_the_plain_default_template(api):
    backend, url = api
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    got = oai(url).chat.completions.create(model="fake", messages=messages, max_completion_tokens=5)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == "hello"
    prompt = "".join(chr(i) for i in backend.calls[-1][0])
    assert prompt == "system: be brief\nuser: hi\nassistant: "


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(api):
    backend, url = api
    post(url, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    prompt_ids, params = backend.calls[-1]
    assert params.max_tokens == FakeBackend.max_context - len(prompt_ids)


def test_chat_text_parts_and_logprobs(api):
    _, url = api
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    got = oai(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": content}],
                                           max_tokens=3, logprobs=True)
    assert [c.token for c in got.choices[0].logprobs.content] == ["h", "e", "l"]


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streams_equal_the_whole_answer(api, kind):
    _, url = api
    client = oai(url)
    if kind == "completions":
        whole = client.completions.create(model="fake", prompt="hi", max_tokens=6).choices[0].text
        chunks = list(client.completions.create(model="fake", prompt="hi", max_tokens=6, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        messages = [{"role": "user", "content": "hi"}]
        whole = client.chat.completions.create(model="fake", messages=messages, max_tokens=6).choices[0].message.content
        chunks = list(client.chat.completions.create(model="fake", messages=messages, max_tokens=6, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == "hello "
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []


def test_sse_ends_with_done(api):
    _, url = api
    body = {"model": "fake", "prompt": "hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_models_list_and_lookup(api):
    _, url = api
    client = oai(url)
    assert [m.id for m in client.models.list()] == ["fake"]
    assert client.models.retrieve("fake").id == "fake"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_is_open(serve):
    _, url = serve(auth_token=TOKEN)
    assert httpx.get(url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------------------
# Errors


def cases_400():
    """(path, body, param the error must name)."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    return [
        (c, {"model": "fake"}, "prompt"),
        (c, {"model": "fake", "prompt": ""}, "prompt"),
        (c, {"model": "fake", "prompt": 5}, "prompt"),
        (c, {"model": "fake", "prompt": ["a", "b"]}, "prompt"),
        (c, {"model": "fake", "prompt": [300]}, "prompt"),
        (c, {"model": "fake", "prompt": "x" * 200, "max_tokens": 1}, "prompt"),
        (c, {"model": "fake", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        (c, {"model": "fake", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        (c, {"model": "fake", "prompt": "hi", "max_tokens": 128}, "max_tokens"),
        (c, {"model": "fake", "prompt": "hi", "temperature": -1}, "temperature"),
        (c, {"model": "fake", "prompt": "hi", "top_p": 0}, "top_p"),
        (c, {"model": "fake", "prompt": "hi", "top_k": -2}, "top_k"),
        (c, {"model": "fake", "prompt": "hi", "seed": 2**64}, "seed"),
        (c, {"model": "fake", "prompt": "hi", "stop": [""]}, "stop"),
        (c, {"model": "fake", "prompt": "hi", "stop": ["a"] * 17}, "stop"),
        (c, {"model": "fake", "prompt": "hi", "stop": 5}, "stop"),
        (c, {"model": "fake", "prompt": "hi", "stop_token_ids": [999]}, "stop_token_ids"),
        (c, {"model": "fake", "prompt": "hi", "n": 0}, "n"),
        (c, {"model": "fake", "prompt": "hi", "n": 17}, "n"),
        (c, {"model": "fake", "prompt": "hi", "best_of": 17}, "best_of"),
        (c, {"model": "fake", "prompt": "hi", "suffix": "x"}, "suffix"),
        (c, {"model": "fake", "prompt": "hi", "logprobs": 21}, "logprobs"),
        (c, {"model": "fake", "prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        (c, {"model": "fake", "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        (c, {"model": "fake", "prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty"),
        (c, {"model": "fake", "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        (c, {"model": "fake", "prompt": "hi", "min_p": 1.5}, "min_p"),
        (c, {"model": "fake", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        (c, {"model": "fake", "prompt": "hi", "logit_bias": {"x": 1.0}}, "logit_bias"),
        (c, {"model": "fake", "prompt": "hi", "logit_bias": {"999": 1.0}}, "logit_bias"),
        (c, {"model": "fake", "prompt": "hi", "logit_bias": {"1": 101.0}}, "logit_bias"),
        (c, {"model": "fake", "prompt": "hi", "skip_special_tokens": False}, "skip_special_tokens"),
        (c, {"model": "fake", "prompt": "hi", "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        (c, {"model": "fake", "prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
         "structured_outputs"),
        (c, {"model": "fake", "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        (ch, {"model": "fake", "messages": []}, "messages"),
        (ch, {"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (ch, {"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        (ch, {"model": "fake", "messages": [{"role": "user", "content": "x" * 200}]}, "messages"),
        (ch, {"model": "fake", "messages": user, "max_completion_tokens": 0}, "max_completion_tokens"),
        (ch, {"model": "fake", "messages": user, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        (ch, {"model": "fake", "messages": user, "top_logprobs": 2}, "top_logprobs"),
        (ch, {"model": "fake", "messages": user, "tools": [{"type": "function"}]}, "tools"),
        (ch, {"model": "fake", "messages": user, "response_format": {"type": "json_schema"}}, "response_format"),
        (ch, {"model": "fake", "messages": user, "response_format": {"type": "yaml"}}, "response_format.type"),
        (ch, {"model": "fake", "messages": user, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ]


@pytest.mark.parametrize(("path", "body", "param"), cases_400(), ids=lambda v: None)
def test_bad_requests_get_openai_shaped_400_naming_the_field(api, path, body, param):
    _, url = api
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(param)


def test_body_that_is_not_json_is_a_400(api):
    _, url = api
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_oversized_body_is_refused(serve):
    _, url = serve(max_message_bytes=64 << 10, max_prompt_bytes=32 << 10)
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x" * (128 << 10)})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("body")
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x" * (48 << 10), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_model_is_404(api):
    _, url = api
    with pytest.raises(openai.NotFoundError) as e:
        oai(url).completions.create(model="gpt-9", prompt="hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_unknown_route_is_an_openai_shaped_404(api):
    _, url = api
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]


@pytest.mark.parametrize("api_key", ["none", "wrong-token"])
def test_auth_on_refuses_a_missing_or_wrong_token(serve, api_key):
    _, url = serve(auth_token=TOKEN)
    with pytest.raises(openai.AuthenticationError) as e:
        oai(url, api_key=api_key).completions.create(model="fake", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401


def test_auth_on_accepts_the_token(serve):
    _, url = serve(auth_token=TOKEN)
    got = oai(url, api_key=TOKEN).completions.create(model="fake", prompt="hi", max_tokens=2)
    assert got.choices[0].text == "he"


def test_over_capacity_is_429(serve):
    backend, url = serve(FakeBackend(step_s=0.05), max_in_flight=1)
    body = {"model": "fake", "prompt": "hi", "max_tokens": 60, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as first:
        assert first.status_code == 200
        r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
    assert r.headers["retry-after"] == "1"  # OpenAI's SDKs wait this long before retrying


def test_in_flight_bound_is_shared_with_a_given_frontend(serve):
    backend = FakeBackend()
    frontend = Frontend([backend], FrontendConfig(max_in_flight=1))
    _, url = serve(backend, frontend=frontend)
    assert frontend.admission.try_acquire()  # as a gRPC request in flight would
    try:
        assert post(url, "/v1/completions", {"model": "fake", "prompt": "hi"}).status_code == 429
    finally:
        frontend.admission.release()
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "hi"}).status_code == 200


def test_backend_down_is_503(serve):
    _, url = serve(FakeBackend(fail=True))
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    assert r.headers["retry-after"] == "1"


def wait_for_cancel(backend: FakeBackend, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (not backend.cancelled or backend.active) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_client_leaving_a_stream_cancels_the_request(serve):
    backend, url = serve(FakeBackend(step_s=0.05))
    body = {"model": "fake", "prompt": "hi", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # leaving the block closed the connection after one chunk
    wait_for_cancel(backend)
    assert len(backend.cancelled) == 1 and not backend.active


def test_client_leaving_a_plain_request_cancels_it(serve):
    backend, url = serve(FakeBackend(step_s=0.05))
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 100}, timeout=0.5)
    wait_for_cancel(backend)
    assert len(backend.cancelled) == 1 and not backend.active


# ---------------------------------------------------------------------------------------------------------
# Chat templates


def test_chat_template_from_tokenizer_config(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    config = {"chat_template": template, "bos_token": {"content": "<s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rendered = ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "hi"}])
    assert rendered == "<s><user>hi<assistant>"


def test_chat_template_file_wins_and_named_templates_pick_default(tmp_path):
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "D"
    (tmp_path / "chat_template.jinja").write_text("F{{ messages | length }}")
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "F1"


def test_chat_template_exception_is_a_400(loop, tmp_path):
    class TemplatedBackend(FakeBackend):
        model_path = str(tmp_path)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x"}))
    server, port = loop.run(serve_http([TemplatedBackend()], "127.0.0.1", 0))
    try:
        r = post(f"http://127.0.0.1:{port}", "/v1/chat/completions",
                 {"model": "fake", "messages": [{"role": "assistant", "content": "hi"}]})
    finally:
        loop.run(server.stop(0))
    assert r.status_code == 400 and "user first" in r.json()["error"]["message"]


def test_stop_closes_the_port(loop):
    server, port = loop.run(serve_http([FakeBackend()], "127.0.0.1", 0))
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    loop.run(server.stop(0))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_graceful_stop_lets_a_stream_finish(loop):
    server, port = loop.run(serve_http([FakeBackend(step_s=0.02)], "127.0.0.1", 0))
    body = {"model": "fake", "prompt": "hi", "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        stopping = asyncio.run_coroutine_threadsafe(server.stop(10.0), loop.loop)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    stopping.result(30)
