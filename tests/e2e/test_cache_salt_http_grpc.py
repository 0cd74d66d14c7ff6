"""cache_salt (vLLM's) over the OpenAI HTTP API with the official client, and over gRPC with MoerayClient: a
salted request reuses only the prefixes cached by requests with the same salt, as the usage's cached_tokens
reports."""

from __future__ import annotations

import openai
import pytest

from moeray.actors.frontend import FrontendConfig, serve_frontend
from moeray.actors.http import serve_http
from moeray.clients.cli import main as cli_main
from moeray.clients.client import MoerayClient
from moeray.clients.messages import InvalidRequestError

# long enough for several full blocks at the default block size; no other test in this module caches it
SHARED = "Salted caches keep tenants apart: " + "the same words again and again, " * 6


@pytest.fixture(scope="module")
def client(loop_thread, real_backends):
    server, port = loop_thread.run(serve_http(real_backends, "127.0.0.1", 0, FrontendConfig()))
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    loop_thread.run(server.stop(0))


@pytest.fixture(scope="module")
def model(real_backends) -> str:
    return real_backends[0].model_name


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def test_completions_reuse_only_the_same_salt(client, model):
    def run(suffix, salt=None):
        body = {"ignore_eos": True} | ({"cache_salt": salt} if salt is not None else {})
        return client.completions.create(model=model, prompt=SHARED + suffix, max_tokens=3, temperature=0,
                                         extra_body=body)

    first = run("alpha", "tenant-a")
    assert cached(first) == 0
    other = run("beta", "tenant-b")
    assert cached(other) == 0  # tenant-a's prefix is invisible to tenant-b
    assert cached(run("gamma")) == 0  # and to unsalted requests
    same = run("delta", "tenant-a")
    assert 0 < cached(same) < same.usage.prompt_tokens
    # the salt changes what is reused, never what is computed
    assert run("beta").choices[0].text == other.choices[0].text


def test_chat_reuses_only_the_same_salt(client, model):
    def run(salt):
        return client.chat.completions.create(model=model, max_tokens=2, temperature=0,
                                              messages=[{"role": "user", "content": SHARED + "chat"}],
                                              extra_body={"cache_salt": salt, "ignore_eos": True})

    assert cached(run("chat-a")) == 0
    assert cached(run("chat-b")) == 0
    assert cached(run("chat-a")) > 0


@pytest.mark.parametrize("salt", ["", "x" * 257, 7])
def test_bad_salt_is_a_400_naming_cache_salt(client, model, salt):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body={"cache_salt": salt})
    assert e.value.body["param"] == "cache_salt" and "cache_salt" in e.value.body["message"]


def test_grpc_client_reuses_only_the_same_salt(loop_thread, real_backends):
    server, port = loop_thread.run(serve_frontend(real_backends, "127.0.0.1", 0, config=FrontendConfig()))
    try:
        with MoerayClient(f"127.0.0.1:{port}") as c:
            def run(salt):
                return c.complete(SHARED + "grpc", max_tokens=2, temperature=0.0, ignore_eos=True, cache_salt=salt)

            assert run("grpc-a").usage.cached_tokens == 0
            assert run("grpc-b").usage.cached_tokens == 0
            assert run("grpc-a").usage.cached_tokens > 0
            with pytest.raises(InvalidRequestError, match="cache_salt"):
                run("x" * 257)
    finally:
        loop_thread.run(server.stop(0))


def test_cli_generate_passes_the_salt(loop_thread, real_backends, capsys):
    server, port = loop_thread.run(serve_frontend(real_backends, "127.0.0.1", 0, config=FrontendConfig()))
    try:
        def run(salt: str) -> str:
            argv = ["generate", SHARED + "cli", "--address", f"127.0.0.1:{port}", "--max-tokens", "2",
                    "--temperature", "0", "--ignore-eos", "--cache-salt", salt, "-v"]
            assert cli_main(argv) == 0
            return capsys.readouterr().err

        assert "(0 cached)" in run("cli-a")
        assert "(0 cached)" in run("cli-b")
        assert "(0 cached)" not in run("cli-a")  # the same salt again: its prefix is reused
        assert cli_main(["generate", "hi", "--address", f"127.0.0.1:{port}", "--cache-salt", "x" * 257]) != 0
        assert "cache_salt" in capsys.readouterr().err
    finally:
        loop_thread.run(server.stop(0))
