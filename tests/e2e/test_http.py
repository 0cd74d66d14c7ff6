"""The OpenAI-compatible HTTP API over the real engine, driven by the official `openai` client.

Needs the module-scoped `real_backends` fixture (tests/e2e/conftest.py). The HTTP server runs on its own event
loop in a background thread, as the gRPC front end does in test_grpc.py. The tiny model ships no chat template,
so chat goes through the plain default ("<role>: content" lines, then "assistant: ").
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from support.waiting import wait_until

from moeray.actors.frontend import FrontendConfig
from moeray.actors.http import serve_http
from moeray.common.sampling import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
TOKEN = "e2e-http-token"


@pytest.fixture(scope="module")
def start_http(loop_thread, real_backends):
    """Factory: the base URL of an HTTP API over the real backends with the given FrontendConfig fields."""
    servers = []

    def start(**config) -> str:
        server, port = loop_thread.run(serve_http(real_backends, "127.0.0.1", 0, FrontendConfig(**config)))
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        loop_thread.run(server.stop(0))


@pytest.fixture(scope="module")
def url(start_http) -> str:
    return start_http()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def backend(real_backends):
    return real_backends[0]


@pytest.fixture(scope="module")
def model(backend) -> str:
    return backend.model_name


def backend_greedy(loop_thread, backend, prompt_ids: list[int], max_tokens: int) -> list[int]:
    async def collect():
        ids = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for delta in backend.generate(f"direct-{time.monotonic_ns()}", prompt_ids, params):
            ids.extend(delta.token_ids)
        return ids

    return loop_thread.run(collect())


# ---------------------------------------------------------------------------------------------------------
# The openai client, completions and chat, streaming and not


def test_models_lists_the_served_model(client, backend):
    models = list(client.models.list())
    assert [m.id for m in models] == [backend.model_name]


def test_completion_equals_the_backends_own_greedy_output(client, backend, model, loop_thread):
    want = backend_greedy(loop_thread, backend, backend.tokenize(PROMPT), 12)
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == backend.detokenize(want)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12
    assert got.usage.prompt_tokens == len(backend.tokenize(PROMPT))


def test_completion_stream_equals_the_whole_answer(client, model):
    params = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0.7, "seed": 3}
    whole = client.completions.create(**params)
    chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_token_id_prompt_works_like_text(client, backend, model):
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0.0)
    by_ids = client.completions.create(model=model, prompt=backend.tokenize(PROMPT), max_tokens=6, temperature=0.0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_logprobs(client, model):
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0.0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0.0 for x in lp.token_logprobs)


def test_chat_completion(client, model, backend, loop_thread):
    messages = [{"role": "user", "content": "Once upon a time"}]
    want = backend_greedy(loop_thread, backend, backend.tokenize("user: Once upon a time\nassistant: "), 8)
    got = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8, temperature=0.0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == backend.detokenize(want)
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 8


def test_chat_stream_equals_the_whole_answer(client, model):
    params = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "seed": 11}
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(**params, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# ---------------------------------------------------------------------------------------------------------
# Errors


def bad_requests(backend, model: str) -> list[tuple[str, dict]]:
    """(param the 400 must name, completion request fields), sized to the served model."""
    ctx, vocab = backend.max_context, backend.vocab_size
    return [
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": [vocab]}),
        ("prompt", {"prompt": " ".join(["hello"] * (2 * ctx)), "max_tokens": 1}),
        ("max_tokens", {"prompt": "hi", "max_tokens": ctx}),
        ("max_tokens", {"prompt": "hi", "max_tokens": 0}),
        ("temperature", {"prompt": "hi", "temperature": -1.0}),
        ("top_p", {"prompt": "hi", "top_p": 1.5}),
        ("stop", {"prompt": "hi", "stop": [""]}),
        ("n", {"prompt": "hi", "n": 0}),
        ("presence_penalty", {"prompt": "hi", "presence_penalty": 3.0}),
        ("logit_bias", {"prompt": "hi", "logit_bias": {str(vocab): 1}}),
        ("response_format", {"prompt": "hi", "extra_body": {"response_format": {"type": "json_schema"}}}),
    ]


def test_bad_requests_get_openai_shaped_400s(client, backend, model):
    for param, fields in bad_requests(backend, model):
        prompt = fields.pop("prompt")
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=prompt, **fields)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, (param, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"].startswith(param)
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_chat_bad_request_names_the_message(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_auth_gives_401_without_the_token_and_serves_with_it(start_http, model):
    secured = start_http(auth_token=TOKEN)
    for key in ("", "wrong-token"):
        anonymous = openai.OpenAI(base_url=f"{secured}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.completions.create(model=model, prompt="hi", max_tokens=2)
    assert httpx.post(f"{secured}/v1/completions", json={"prompt": "hi"}).status_code == 401
    authorized = openai.OpenAI(base_url=f"{secured}/v1", api_key=TOKEN, max_retries=0)
    assert authorized.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].finish_reason
    assert httpx.get(f"{secured}/health").status_code == 200  # probes need no token


def test_disconnect_mid_stream_frees_the_blocks(client, model, backend, real_backends):
    blocks_before = [b.num_free_blocks() for b in real_backends]
    max_tokens = min(backend.max_context - len(backend.tokenize(PROMPT)) - 1, 400)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    next(iter(stream))
    assert any(b.load() for b in real_backends)
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: all(b.load() == 0 for b in real_backends), what="backends to go idle")
    wait_until(lambda: [b.num_free_blocks() for b in real_backends] == blocks_before, what="all KV blocks back")


# ---------------------------------------------------------------------------------------------------------
# `moeray serve --http-port`: HTTP beside gRPC, one front end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_http_beside_grpc(real_backends, model, monkeypatch):
    from moeray.actors import serve as serve_module
    from moeray.clients.client import MoerayClient
    from moeray.common.config import ServeConfig

    monkeypatch.setattr(serve_module, "build_backends", lambda options: (real_backends, lambda: None))
    grpc_port, http_port = free_port(), free_port()
    options = serve_module.ServeOptions(engine=ServeConfig(), port=grpc_port, http_port=http_port,
                                        frontend=FrontendConfig(auth_token=TOKEN))
    answers: dict[str, object] = {}

    def drive() -> None:
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_until(lambda: _healthy(url), timeout_s=60, what="the HTTP API")
            oai = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
            answers["http"] = oai.completions.create(model=model, prompt="hi", max_tokens=3,
                                                    extra_body={"ignore_eos": True}).usage.completion_tokens
            with MoerayClient(f"127.0.0.1:{grpc_port}", token=TOKEN) as c:
                answers["grpc"] = len(c.complete("hi", max_tokens=3, ignore_eos=True).token_ids)
        except Exception as e:  # reported by the test body
            answers["error"] = e
        finally:
            os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    asyncio.run(asyncio.wait_for(serve_module.serve(options, stop_signals=(signal.SIGUSR1,)), 180))
    thread.join(10)
    assert "error" not in answers, answers.get("error")
    assert answers == {"http": 3, "grpc": 3}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------------------------
# vLLM/OpenAI parity over the real engine (issue 16)


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_penalties_lower_repeats(client, model):
    def ids(**extra):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
                                      logprobs=0)
        return r.choices[0].logprobs.tokens

    plain = ids()
    assert _repeats(ids(frequency_penalty=2.0)) < _repeats(plain)
    assert _repeats(ids(presence_penalty=2.0)) < _repeats(plain)
    assert _repeats(ids(repetition_penalty=2.0)) < _repeats(plain)


def test_n_returns_n_distinct_choices(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.completion_tokens == 36
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], n=2,
                                          max_tokens=10, temperature=1.0, seed=5)
    assert len({c.message.content for c in chat.choices}) == 2


def test_chat_top_logprobs_has_k_sorted_entries(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        values = [a.logprob for a in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the sampled token is the best


def test_completion_logprobs_k_plus_the_sampled_token(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.5, logprobs=2, seed=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    extra = 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and len(top) <= 3  # keyed by text: tokens with the same text (a partial UTF-8) share one
        if len(top) == 3:
            assert top[token] == pytest.approx(logprob)
        extra += len(top) == 3
    assert extra > 0  # at temperature 1.5 some sampled tokens are not among the two most likely


def test_json_schema_output_validates(client, model):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    assert r.choices[0].finish_reason == "stop"
    obj = client.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0.8, seed=1,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert obj.choices[0].text in ("yes", "no")


def test_usage_reports_cached_tokens_and_fingerprint(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert r.system_fingerprint.startswith("fp_")
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


# ---------------------------------------------------------------------------------------------------------
# vLLM's prompt_logprobs, echo with logprobs, include_stop_str_in_output, skip_special_tokens


@pytest.fixture(scope="module")
def reference_logprobs():
    """The reference model's log_softmax over a prompt (fp32): row i predicts token i + 1."""
    import torch
    from support.tiny_models import build_with_tokenizer

    from moeray.models.reference import ReferenceModel

    ref = ReferenceModel.from_pretrained(build_with_tokenizer(), num_expert_groups=1)
    return lambda ids: torch.log_softmax(ref.forward(torch.tensor([ids]))[0].float(), dim=-1)


def test_prompt_logprobs_match_the_reference(client, backend, model, reference_logprobs):
    ids = backend.tokenize(PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    got = r.choices[0].model_extra["prompt_logprobs"]
    lps = reference_logprobs(ids)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        row, entry = lps[i - 1], got[i]
        assert abs(entry[str(ids[i])]["logprob"] - float(row[ids[i]])) < 1e-4
        assert entry[str(ids[i])]["rank"] == int((row >= row[ids[i]]).sum())
        want = row.topk(3)
        for t, v in zip(want.indices.tolist(), want.values.tolist(), strict=True):
            assert abs(entry[str(t)]["logprob"] - v) < 1e-4
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and all(len(d) == 1 for d in plp[1:]) and len(plp) == chat.usage.prompt_tokens


def test_echo_with_logprobs_returns_the_prompt_tokens_logprobs(client, backend, model, reference_logprobs):
    ids = backend.tokenize(PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp, lps = r.choices[0].logprobs, reference_logprobs(ids)
    assert r.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(lps[i - 1, ids[i]])) < 1e-4
        assert len(lp.top_logprobs[i]) in (2, 3)


def test_include_stop_str_in_output(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    at = full.index(stop)
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    kept = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True}).choices[0]
    assert cut.text == full[:at] and kept.text == full[:at + len(stop)]
    assert cut.finish_reason == kept.finish_reason == "stop"


def test_skip_special_tokens_false_keeps_eos_in_the_text(client, backend, model):
    eos = backend.dep.tokenizer.token_to_id("<|eos|>")
    body = {"logit_bias": {str(eos): 100}}
    skipped = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, extra_body=body)
    kept = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                     extra_body={**body, "skip_special_tokens": False})
    assert skipped.choices[0].text == "" and kept.choices[0].text == "<|eos|>"
    assert kept.choices[0].finish_reason == "stop"


def test_best_of_returns_the_best_n_of_the_same_samples(client, model):
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 5, "logprobs": 0}
    every = client.completions.create(n=3, **kw).choices  # the same seeds (5, 6, 7) as best_of=3 runs
    best = client.completions.create(n=2, extra_body={"best_of": 3}, **kw).choices
    ranked = sorted(every, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    assert [c.index for c in best] == [0, 1]


def test_grpc_carries_the_same_fields(loop_thread, real_backends, backend, model, reference_logprobs):
    from moeray.actors.frontend import serve_frontend
    from moeray.clients.client import MoerayClient

    server, port = loop_thread.run(serve_frontend(real_backends, "127.0.0.1", 0, config=FrontendConfig()))
    try:
        with MoerayClient(f"127.0.0.1:{port}") as c:
            ids = backend.tokenize(PROMPT)
            out = c.complete(ids, model=model, max_tokens=2, temperature=0.0, prompt_logprobs=2)
            lps = reference_logprobs(ids)
            assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
            for i in range(1, len(ids)):
                (lp, rank, top), row = out.prompt_logprobs[i], lps[i - 1]
                assert abs(lp - float(row[ids[i]])) < 1e-4 and rank == int((row >= row[ids[i]]).sum())
                assert [t for t, _ in top] == lps[i - 1].topk(2).indices.tolist()
            chunks = list(c.generate(ids, model=model, max_tokens=2, temperature=0.0, prompt_logprobs=0))
            assert len(chunks[0].prompt_logprobs) == len(ids) and all(ch.prompt_logprobs is None for ch in chunks[1:])
            full = c.complete(PROMPT, model=model, max_tokens=16, temperature=0.0, ignore_eos=True).text
            stop = full[8:11]
            kept = c.complete(PROMPT, model=model, max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop],
                              include_stop_str_in_output=True)
            assert kept.text == full[:full.index(stop) + len(stop)]
            eos = backend.dep.tokenizer.token_to_id("<|eos|>")
            special = c.complete(PROMPT, model=model, max_tokens=3, temperature=0.0, logit_bias={eos: 100.0},
                                 skip_special_tokens=False)
            assert special.text == "<|eos|>"
    finally:
        loop_thread.run(server.stop(0))
