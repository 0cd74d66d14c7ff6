"""vLLM's include_stop_str_in_output and skip_special_tokens: false, against slow references.

TextStream with include_stop: the streamed text, however the ids are chunked, is the shortest prefix of the
whole text that ends in a stop string (the whole text when none occurs). Over HTTP (a fake char-level backend):
the stop string is kept at the end of the text, and special tokens (EOS) appear in the text and in the
log-probabilities' token strings only when skip_special_tokens is false.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.loop import LoopThread
from test_http_api import EOS, FakeBackend

from moeray.actors.frontend import FrontendConfig
from moeray.actors.frontend_core import detokenizer
from moeray.actors.frontend_wire import request_to_dict
from moeray.actors.http import serve_http
from moeray.actors.text_stream import TextStream
from moeray.clients import messages
from moeray.common.api import ModelSpec, parse_generate_request


def detokenize(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def reference_with_stop(text: str, stops: list[str]) -> str:
    """Slow: the shortest prefix of text that ends in a stop string."""
    for end in range(1, len(text) + 1):
        if any(text[:end].endswith(s) for s in stops):
            return text[:end]
    return text


def streamed(text: str, sizes: list[int], stops: list[str]) -> tuple[str, bool]:
    ids, out, ts, i, k = list(text.encode()), [], TextStream(detokenize, stops, include_stop=True), 0, 0
    while i < len(ids) and not ts.stopped:
        n = sizes[k % len(sizes)]
        out.append(ts.push(ids[i:i + n]))
        i, k = i + n, k + 1
    out.append(ts.flush())
    return "".join(out), ts.stopped


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc €", max_size=30), st.lists(st.text(alphabet="abc €", min_size=1, max_size=4),
                                                       min_size=1, max_size=3),
       st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_include_stop_keeps_the_stop_string_however_chunked(text, stops, sizes):
    got, stopped = streamed(text, sizes, stops)
    want = reference_with_stop(text, stops)
    assert got == want
    assert stopped == any(s in text for s in stops)
    if stopped:
        assert any(got.endswith(s) for s in stops)


def test_include_stop_streams_without_holding_back():
    ts = TextStream(detokenize, ["END"], include_stop=True)
    assert ts.push(list(b"abE")) == "abE"  # no hold-back of a possible stop prefix
    assert ts.push(list(b"NDxyz")) == "ND" and ts.stopped
    cut = TextStream(detokenize, ["END"])
    assert cut.push(list(b"abE")) == "ab" and cut.push(list(b"NDxyz")) == "" and cut.stopped


class SpecialBackend(FakeBackend):
    """FakeBackend whose EOS is a special token "<eos>" when skip_special_tokens is false."""

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i == EOS and skip_special_tokens else "<eos>" if i == EOS else chr(i) for i in ids)


@pytest.fixture(scope="module")
def urls():
    loop = LoopThread("stop-special-loop", timeout_s=30.0)
    servers, out = [], []
    for backend in (SpecialBackend(), FakeBackend()):
        server, port = loop.run(serve_http([backend], "127.0.0.1", 0, FrontendConfig()))
        servers.append(server)
        out.append(f"http://127.0.0.1:{port}")
    yield out
    for server in servers:
        loop.run(server.stop(0))
    loop.close()


def complete(url, **body):
    return httpx.post(url + "/v1/completions", json={"prompt": "hi", **body}, timeout=30)


def test_http_include_stop_str_in_output(urls):
    url = urls[0]
    body = {"max_tokens": 20, "stop": ["wor"]}  # the fake model writes "hello world, ..."
    assert complete(url, **body).json()["choices"][0]["text"] == "hello "
    kept = complete(url, **body, include_stop_str_in_output=True).json()["choices"][0]
    assert kept["text"] == "hello wor" and kept["finish_reason"] == "stop"
    chunks = httpx.post(url + "/v1/completions", json={"prompt": "hi", **body, "stream": True,
                                                       "include_stop_str_in_output": True}, timeout=30).text
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in chunks.splitlines()
                   if line.startswith("data: {")) == "hello wor"


def test_http_skip_special_tokens_false_keeps_eos(urls):
    url = urls[0]
    body = {"prompt": "go!", "max_tokens": 8, "logprobs": 0}  # "!" -> EOS after 3 tokens
    skipped = complete(url, **body).json()["choices"][0]
    assert skipped["text"] == "he" and skipped["logprobs"]["tokens"][-1] == ""
    kept = complete(url, **body, skip_special_tokens=False).json()["choices"][0]
    assert kept["text"] == "he<eos>" and kept["logprobs"]["tokens"] == ["h", "e", "<eos>"]


def test_http_skip_special_tokens_false_refused_by_a_backend_that_cannot(urls):
    r = complete(urls[1], max_tokens=2, skip_special_tokens=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "skip_special_tokens"
    with pytest.raises(Exception, match="skip_special_tokens"):
        detokenizer(FakeBackend(), skip_special_tokens=False)


def test_grpc_fields_reach_the_request():
    spec = {"m": ModelSpec(name="m", max_context=64, vocab_size=256)}
    default = parse_generate_request(request_to_dict(messages.build_request("x", model="m")), spec)
    assert default.include_stop_str_in_output is False and default.skip_special_tokens is True
    msg = messages.build_request("x", model="m", include_stop_str_in_output=True, skip_special_tokens=False)
    req = parse_generate_request(request_to_dict(msg), spec)
    assert req.include_stop_str_in_output is True and req.skip_special_tokens is False
