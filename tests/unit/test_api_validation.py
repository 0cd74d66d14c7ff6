"""Request validation at the API edge (common/api.py): every malformed request is rejected naming its field."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.actors.frontend_config import FrontendConfig
from moeray.common.api import (
    GenerateRequest,
    ModelSpec,
    RequestValidationError,
    parse_generate_request,
    to_sampling_params,
    validate_prompt_length,
)
from moeray.common.sampling import SamplingParams

SPEC = ModelSpec(name="m", max_context=64, vocab_size=100)
MODELS = {"m": SPEC}
MAX_PROMPT_BYTES = 32


def parse(data: dict, models=MODELS) -> GenerateRequest:
    return parse_generate_request(data, models, max_prompt_bytes=MAX_PROMPT_BYTES)


# (field the message must name, request)
MALFORMED = [
    ("prompt", {}),
    ("prompt", {"prompt": "", "prompt_token_ids": []}),
    ("prompt", {"prompt": "hi", "prompt_token_ids": [1]}),
    ("prompt", {"prompt": "a\udc80b"}),
    ("prompt", {"prompt": "x" * (MAX_PROMPT_BYTES + 1)}),
    ("prompt", {"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}),  # few characters, too many bytes
    ("prompt", {"prompt": 5}),
    ("prompt", {"prompt": b"bytes"}),
    ("prompt", {"prompt_token_ids": list(range(1, 65))}),  # fills the context: no room to generate
    ("prompt_token_ids", {"prompt_token_ids": [-1]}),
    ("prompt_token_ids", {"prompt_token_ids": [100]}),
    ("prompt_token_ids", {"prompt_token_ids": ["a"]}),
    ("prompt_token_ids", {"prompt_token_ids": [1.5]}),
    ("prompt_token_ids", {"prompt_token_ids": [True]}),
    ("prompt_token_ids", {"prompt_token_ids": 7}),
    ("max_tokens", {"prompt_token_ids": [1] * 60, "max_tokens": 16}),
    ("max_tokens", {"prompt": "hi", "max_tokens": 0}),
    ("max_tokens", {"prompt": "hi", "max_tokens": -5}),
    ("max_tokens", {"prompt": "hi", "max_tokens": 64}),
    ("max_tokens", {"prompt": "hi", "max_tokens": 10**9}),
    ("max_tokens", {"prompt": "hi", "max_tokens": "16"}),
    ("max_tokens", {"prompt": "hi", "max_tokens": 2.0}),
    ("max_tokens", {"prompt": "hi", "max_tokens": True}),
    ("max_tokens", {"prompt": "hi", "max_tokens": None}),
    ("temperature", {"prompt": "hi", "temperature": -0.1}),
    ("temperature", {"prompt": "hi", "temperature": math.nan}),
    ("temperature", {"prompt": "hi", "temperature": math.inf}),
    ("temperature", {"prompt": "hi", "temperature": "hot"}),
    ("top_p", {"prompt": "hi", "top_p": 0.0}),
    ("top_p", {"prompt": "hi", "top_p": 1.5}),
    ("top_p", {"prompt": "hi", "top_p": -1.0}),
    ("top_p", {"prompt": "hi", "top_p": math.nan}),
    ("top_k", {"prompt": "hi", "top_k": -1}),
    ("top_k", {"prompt": "hi", "top_k": 1.5}),
    ("seed", {"prompt": "hi", "seed": 2**64}),
    ("seed", {"prompt": "hi", "seed": "x"}),
    ("stop", {"prompt": "hi", "stop": [""]}),
    ("stop", {"prompt": "hi", "stop": ["x" * 300]}),
    ("stop", {"prompt": "hi", "stop": ["a"] * 17}),
    ("stop", {"prompt": "hi", "stop": "abc"}),
    ("stop", {"prompt": "hi", "stop": ["ok", "\udc80"]}),
    ("stop_token_ids", {"prompt": "hi", "stop_token_ids": [-1]}),
    ("stop_token_ids", {"prompt": "hi", "stop_token_ids": [1000]}),
    ("model", {"prompt": "hi", "model": "nope"}),
    ("request_id", {"prompt": "hi", "request_id": "x" * 200}),
    ("request_id", {"prompt": "hi", "request_id": "bad\nid"}),
    ("request_id", {"prompt": "hi", "request_id": "ünïcode"}),
    ("max_token", {"prompt": "hi", "max_token": 5}),  # a misspelt field is not silently ignored
    ("ignore_eos", {"prompt": "hi", "ignore_eos": "yes"}),
    ("logprobs", {"prompt": "hi", "logprobs": 1}),
]


def test_table_is_big_enough():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize(("field", "data"), MALFORMED, ids=[f"{i}-{f}" for i, (f, _) in enumerate(MALFORMED)])
def test_malformed_request_is_rejected_naming_the_field(field, data):
    with pytest.raises(RequestValidationError) as info:
        parse(data)
    assert field in info.value.fields
    assert str(info.value).startswith(field) or f"; {field}" in str(info.value)


def test_model_required_when_several_are_served():
    models = {**MODELS, "other": ModelSpec(name="other", max_context=32, vocab_size=50)}
    with pytest.raises(RequestValidationError, match="model: required"):
        parse({"prompt": "hi"}, models)


def test_unknown_model_message_lists_served_models():
    with pytest.raises(RequestValidationError, match="served: m"):
        parse({"prompt": "hi", "model": "gpt"})


def test_empty_model_resolves_to_the_only_one():
    assert parse({"prompt": "hi"}).model == "m"


def test_valid_request_converts_to_sampling_params():
    request = parse(
        {
            "prompt_token_ids": [1, 2, 3],
            "max_tokens": 8,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 5,
            "seed": -7,
            "stop": ["\n"],
            "stop_token_ids": [0],
            "ignore_eos": True,
            "logprobs": True,
        }
    )
    assert to_sampling_params(request) == SamplingParams(
        max_tokens=8,
        temperature=0.0,
        top_k=5,
        top_p=0.9,
        seed=-7,
        stop_token_ids=[0],
        stop=["\n"],
        ignore_eos=True,
        logprobs=True,
    )


def test_prompt_and_max_tokens_exactly_fill_the_context():
    request = parse({"prompt_token_ids": [1] * 48, "max_tokens": 16})
    assert request.max_tokens == 16


def test_tokenized_prompt_too_long_names_prompt():
    request = parse({"prompt": "hello"})
    with pytest.raises(RequestValidationError) as info:
        validate_prompt_length(request, 64, SPEC)
    assert info.value.fields == ["prompt"]


def test_tokenized_prompt_plus_max_tokens_too_long_names_max_tokens():
    request = parse({"prompt": "hello", "max_tokens": 20})
    with pytest.raises(RequestValidationError, match="max_tokens: .*at most 14") as info:
        validate_prompt_length(request, 50, SPEC)
    assert info.value.fields == ["max_tokens"]


def test_without_models_only_static_checks_run():
    request = GenerateRequest.model_validate({"prompt": "hi", "max_tokens": 10**6, "model": "anything"})
    assert request.model == "anything"


# ---- fuzz: one corrupted field at a time, and arbitrary junk

VALID = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=8),
        "max_tokens": st.integers(1, 32),
        "temperature": st.floats(0, 5),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(0, 50),
        "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    }
)

INVALID_VALUES = {
    "max_tokens": st.integers(max_value=0) | st.integers(min_value=64) | st.floats() | st.text(),
    "temperature": st.floats(max_value=-1e-9) | st.just(math.nan) | st.just(math.inf) | st.text(),
    "top_p": st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True) | st.just(math.nan),
    "top_k": st.integers(max_value=-1) | st.floats() | st.text(),
    "seed": st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1) | st.text(),
    "prompt_token_ids": st.lists(st.integers(max_value=-1) | st.integers(min_value=100), min_size=1, max_size=4),
    "stop_token_ids": st.lists(st.integers(max_value=-1) | st.integers(min_value=100), min_size=1, max_size=4),
    "stop": st.lists(st.just(""), min_size=1, max_size=3) | st.lists(st.text(min_size=257), min_size=1, max_size=1),
    "model": st.text(min_size=1).filter(lambda s: s != "m"),
    "request_id": st.text(min_size=129) | st.sampled_from(["a\tb", "\x00", "é"]),
}


@settings(max_examples=300, deadline=None)
@given(base=VALID, field=st.sampled_from(sorted(INVALID_VALUES)), data=st.data())
def test_fuzz_one_bad_field_is_named(base, field, data):
    request = dict(base)
    if field == "prompt_token_ids":
        request.pop("prompt")
    request[field] = data.draw(INVALID_VALUES[field])
    with pytest.raises(RequestValidationError) as info:
        parse(request)
    assert field in info.value.fields, str(info.value)
    assert field in str(info.value)


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = sorted(GenerateRequest.model_fields) + ["bogus"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JUNK, max_size=6))
def test_fuzz_junk_is_accepted_or_rejected_cleanly(data):
    try:
        request = parse(data)
    except RequestValidationError as e:
        assert e.fields and all(f in str(e) for f in e.fields)
        return
    to_sampling_params(request)  # anything accepted is a valid engine request


@settings(max_examples=200, deadline=None)
@given(VALID)
def test_fuzz_valid_requests_pass(base):
    request = parse(base)
    assert to_sampling_params(request).max_tokens == base["max_tokens"]


# ---- front end config


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_prompt_bytes": 10, "max_message_bytes": 10}, "max_prompt_bytes"),
        ({"auth_token": "a", "auth_token_path": "/x"}, "auth_token"),
        ({"auth_token": "  "}, "auth_token"),
        ({"tls_cert_path": "/c"}, "tls_key_path"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_frontend_config_rejects(fields, match):
    with pytest.raises(ValueError, match=match):
        FrontendConfig(**fields)


def test_frontend_token_from_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert FrontendConfig(auth_token_path=path).resolve_token() == "s3cret"
    assert FrontendConfig().resolve_token() is None


def test_frontend_empty_token_file_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        FrontendConfig(auth_token_path=path).resolve_token()
