"""OpenAI/vLLM parity of the HTTP API over a fake backend: unknown fields, n, log-probabilities with alternatives,
the new sampling fields reaching the engine, /metrics, /version, /tokenize, /detokenize, /openapi.json."""

from __future__ import annotations

import json

import httpx
import pytest
from support.loop import LoopThread
from test_http_api import WORDS, FakeBackend, http_servers

from moeray.actors.frontend import FrontendConfig
from moeray.actors.http import serve_http
from moeray.common.sampling import StepDelta

ALTERNATIVES = [(ord("q"), -0.1), (ord("x"), -0.2), (ord("z"), -0.3), (ord("j"), -0.4)]  # never sampled


class RichBackend(FakeBackend):
    """FakeBackend plus top-k alternatives (never the sampled token), cached prompt tokens and metrics."""

    async def generate(self, request_id, prompt_ids, params):
        self.calls.append((list(prompt_ids), params))
        for i in range(params.max_tokens):
            finish = "length" if i == params.max_tokens - 1 else None
            top = [ALTERNATIVES[:params.top_logprobs]] if params.top_logprobs else None
            prompt = None
            if i == 0 and params.prompt_logprobs is not None:  # position j: logprob -j, rank j, k alternatives
                prompt = [None] + [(-float(j), j, ALTERNATIVES[:params.prompt_logprobs])
                                   for j in range(1, len(prompt_ids))]
            yield StepDelta(request_id, [ord(WORDS[i % len(WORDS)])], [-0.5] if params.logprobs else None, finish,
                            num_cached_tokens=len(prompt_ids) - 1, top_logprobs=top, prompt_logprobs=prompt)

    async def admin(self, op, **kwargs):
        assert op == "metrics"
        return {"metrics": [{"name": "moeray_running", "value": 3.0, "labels": {"gating": "0"}}]}


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread("http-parity-loop", timeout_s=30.0)
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def serve(loop):
    yield from http_servers(loop, RichBackend)


@pytest.fixture(scope="module")
def api(serve):
    return serve()


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=30)


def test_unknown_fields_are_ignored_and_listed_or_refused_when_strict(api, serve):
    backend, url = api
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "guided_whatever": 1, "zz": {}})
    assert r.status_code == 200 and r.headers["x-moeray-ignored-fields"] == "guided_whatever,zz"
    _, strict = serve(strict_api=True)
    r = post(strict, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "guided_whatever": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_whatever"


def test_sampling_fields_reach_the_engine(api):
    backend, url = api
    body = {"prompt": "hi", "max_tokens": 5, "temperature": 0.7, "top_k": -1, "min_p": 0.1, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_tokens": 2, "logit_bias": {"65": -100},
            "seed": 7, "structured_outputs": {"choice": ["yes", "no"]}}
    assert post(url, "/v1/completions", body).status_code == 200
    p = backend.calls[-1][1]
    assert (p.temperature, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty) == (0.7, 0, 0.1, 0.5, -0.5)
    assert (p.repetition_penalty, p.min_tokens, p.logit_bias, p.seed) == (1.2, 2, {65: -100.0}, 7)
    assert p.structured == {"kind": "choice", "value": json.dumps(["yes", "no"])}
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                           "response_format": {"type": "json_schema", "json_schema": {
                                               "name": "o", "schema": {"type": "object"}}}})
    assert r.status_code == 200 and backend.calls[-1][1].structured["kind"] == "json"


def test_n_choices_have_distinct_seeds_and_share_one_prompt(api):
    backend, url = api
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "n": 3, "seed": 10})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [p.seed for _, p in backend.calls[-3:]] == [10, 11, 12]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 9
    post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "n": 2})
    assert len({p.seed for _, p in backend.calls[-2:]}) == 2


def test_n_choices_stream_with_their_indices(api):
    _, url = api
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            text[c["index"]] += c["delta"].get("content", "")
    assert text == {0: WORDS[:3], 1: WORDS[:3]}
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_completion_top_logprobs_are_k_plus_the_sampled_token(api):
    _, url = api
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(WORDS[:3]) and lp["token_logprobs"] == [-0.5] * 3
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert top == {"q": -0.1, "x": -0.2, token: -0.5}


def test_chat_top_logprobs_are_k_sorted(api):
    _, url = api
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                           "logprobs": True, "top_logprobs": 3})
    for entry in r.json()["choices"][0]["logprobs"]["content"]:
        assert [a["token"] for a in entry["top_logprobs"]] == ["q", "x", "z"]
        values = [a["logprob"] for a in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)


def test_usage_cached_tokens_fingerprint_and_echo(api):
    _, url = api
    body = post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 2, "echo": True}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert body["system_fingerprint"].startswith("fp_")
    assert body["choices"][0]["text"] == "hello" + WORDS[:2]


def test_metrics_version_tokenize_detokenize_openapi(api):
    _, url = api
    post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    text = httpx.get(url + "/metrics").text
    assert 'moeray_http_requests_total{endpoint="completion",status="200"}' in text
    assert "moeray_http_time_to_first_token_seconds_bucket" in text
    assert "moeray_http_inter_token_latency_seconds_count" in text
    assert 'moeray_running{gating="0"} 3.0' in text
    assert httpx.get(url + "/version").json()["version"]
    tok = post(url, "/tokenize", {"prompt": "abc"}).json()
    assert tok["tokens"] == [97, 98, 99] and tok["count"] == 3 and tok["max_model_len"] == 128
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "a"}]}).json()
    assert chat["count"] == len("user: a\nassistant: ")
    assert post(url, "/detokenize", {"tokens": [97, 98]}).json() == {"prompt": "ab"}
    assert post(url, "/detokenize", {"tokens": [999]}).json()["error"]["param"] == "tokens"
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/metrics"} <= set(schema["paths"])


def test_completion_prompt_logprobs_in_vllms_shape(api):
    backend, url = api
    choice = post(url, "/v1/completions", {"prompt": "hey", "max_tokens": 2, "prompt_logprobs": 2}).json()["choices"][0]
    assert backend.calls[-1][0] == [ord(c) for c in "hey"] and backend.calls[-1][1].prompt_logprobs == 2
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 3
    assert plp[1] == {str(ord("e")): {"logprob": -1.0, "rank": 1, "decoded_token": "e"},
                      str(ord("q")): {"logprob": -0.1, "rank": 1, "decoded_token": "q"},
                      str(ord("x")): {"logprob": -0.2, "rank": 2, "decoded_token": "x"}}
    assert list(plp[2]) == [str(ord("y")), str(ord("q")), str(ord("x"))] and plp[2][str(ord("y"))]["rank"] == 2
    assert "prompt_logprobs" not in post(url, "/v1/completions", {"prompt": "hey", "max_tokens": 1}).json()[
        "choices"][0]
    r = post(url, "/v1/completions", {"prompt": "hey", "max_tokens": 1, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_echo_with_logprobs_leads_with_the_prompt_tokens(api):
    backend, url = api
    for stream in (False, True):
        body = {"prompt": "hey", "max_tokens": 2, "echo": True, "logprobs": 1, "stream": stream}
        if stream:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            first = events[0]["choices"][0]
            assert first["text"] == "hey" + WORDS[0]
            lp = first["logprobs"]
        else:
            lp = post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]
            assert lp["tokens"] == ["h", "e", "y", WORDS[0], WORDS[1]]
        assert backend.calls[-1][1].prompt_logprobs == 1
        assert lp["tokens"][:4] == ["h", "e", "y", WORDS[0]]
        assert lp["token_logprobs"][:4] == [None, -1.0, -2.0, -0.5]
        assert lp["top_logprobs"][:3] == [None, {"q": -0.1, "e": -1.0}, {"q": -0.1, "y": -2.0}]
        assert lp["text_offset"][:4] == [0, 1, 2, 3]


def test_chat_prompt_logprobs_top_level(api):
    backend, url = api
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "prompt_logprobs": 0}
    answer = post(url, "/v1/chat/completions", body).json()
    ids = backend.calls[-1][0]
    plp = answer["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    assert all(list(d) == [str(t)] and d[str(t)]["logprob"] == -float(j)
               for j, (t, d) in enumerate(zip(ids[1:], plp[1:], strict=True), 1))
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [e["prompt_logprobs"] for e in events if "prompt_logprobs" in e] == [plp]


class ScoredBackend(RichBackend):
    """Each token's logprob is -(seed % 5) - 0.5 and the text starts at WORDS[seed] (seeds below len(WORDS))."""

    async def generate(self, request_id, prompt_ids, params):
        self.calls.append((list(prompt_ids), params))
        for i in range(params.max_tokens):
            finish = "length" if i == params.max_tokens - 1 else None
            token = ord(WORDS[(params.seed + i) % len(WORDS)])
            yield StepDelta(request_id, [token], [-(params.seed % 5) - 0.5] if params.logprobs else None, finish)


def test_best_of_returns_the_n_best_by_cumulative_logprob(loop):
    backend = ScoredBackend()
    server, port = loop.run(serve_http([backend], "127.0.0.1", 0, FrontendConfig()))
    url = f"http://127.0.0.1:{port}"
    try:
        r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "n": 2, "best_of": 4, "seed": 12})
        body = r.json()
        assert [p.seed for _, p in backend.calls[-4:]] == [12, 13, 14, 15]  # scores -2.5, -3.5, -4.5, -0.5 a token
        assert all(p.logprobs for _, p in backend.calls[-4:])  # forced: the ranking needs them
        assert [c["text"] for c in body["choices"]] == [WORDS[15:18], WORDS[12:15]]  # seeds 15, then 12
        assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["logprobs"] is None
        assert body["usage"]["completion_tokens"] == 6  # the n returned, as vLLM counts
        with_lp = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "best_of": 3, "seed": 0,
                                                "logprobs": 0}).json()["choices"]
        assert len(with_lp) == 1 and with_lp[0]["logprobs"]["token_logprobs"] == [-0.5, -0.5]  # seed 0
        for bad in ({"n": 3, "best_of": 2}, {"best_of": 17}, {"best_of": 2, "stream": True}):
            r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "best_of": 1, "stream": True,
                                             "seed": 1}).status_code == 200
    finally:
        loop.run(server.stop(0))
