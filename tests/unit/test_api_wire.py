"""The front end's plain functions (actors/frontend.py) that need no server: parsing, errors, picking, admin."""

from __future__ import annotations

import grpc
import pytest

from moeray.actors.frontend import (
    Admission,
    BearerTokenInterceptor,
    UndecodableRequest,
    admin_to_proto,
    metrics_to_proto,
    order_by_load,
    parse_generate_bytes,
    request_to_dict,
    status_for,
    status_to_proto,
)
from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.errors import (
    BackendUnavailableError,
    CapacityError,
    ExpertUnavailableError,
    RequestCancelledError,
    RequestError,
)


def _string_field(number: int, raw: bytes) -> bytes:
    """Wire bytes of one length-delimited field (how a string is encoded), with raw content."""
    return bytes([number << 3 | 2, len(raw)]) + raw


def test_valid_bytes_parse_to_a_request():
    msg = pb.GenerateRequest(prompt="héllo", max_tokens=3)
    assert parse_generate_bytes(msg.SerializeToString()) == msg


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_string_field(2, b"\xff\xfe"), "prompt"),
        (_string_field(1, b"m\xc3"), "model"),
        (_string_field(13, b"\x80"), "request_id"),
        (_string_field(9, b"ok") + _string_field(9, b"\xe2\x82"), "stop[1]"),
    ],
)
def test_invalid_utf8_names_the_field(data, field):
    parsed = parse_generate_bytes(data)
    assert isinstance(parsed, UndecodableRequest)
    assert parsed.message.startswith(f"{field}: not valid UTF-8")


def test_garbage_is_reported_as_unparseable():
    parsed = parse_generate_bytes(b"\xff\xff\xff\xff")
    assert isinstance(parsed, UndecodableRequest)
    assert parsed.message.startswith("request:")


def test_unset_optional_fields_are_left_out():
    data = request_to_dict(pb.GenerateRequest(prompt="hi", temperature=0.0))
    assert data["temperature"] == 0.0  # set to zero is not unset
    assert "max_tokens" not in data and "seed" not in data


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (CapacityError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BackendUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (ExpertUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (RequestCancelledError("x"), grpc.StatusCode.CANCELLED),
        (NotImplementedError("x"), grpc.StatusCode.UNIMPLEMENTED),
        (ZeroDivisionError(), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(error, code):
    assert status_for(error) == code


class Loaded:
    def __init__(self, load: int) -> None:
        self._load = load

    def load(self) -> int:
        return self._load


def test_least_loaded_backend_first():
    backends = [Loaded(3), Loaded(1), Loaded(2)]
    assert [b.load() for b in order_by_load(backends, 0)] == [1, 2, 3]


def test_equal_loads_take_turns():
    backends = [Loaded(0), Loaded(0), Loaded(0)]
    firsts = {id(order_by_load(backends, turn)[0]) for turn in range(3)}
    assert len(firsts) == 3


def test_admission_is_bounded():
    admission = Admission(2)
    assert admission.try_acquire() and admission.try_acquire()
    assert not admission.try_acquire()
    admission.release()
    assert admission.try_acquire()


def test_status_keeps_unknown_keys_as_details():
    status = {
        "table_version": 7,
        "actors": [{"name": "e0", "kind": "expert", "load": 0.5, "slots": [1, 2]}],
        "nodes": 2,
    }
    msg = status_to_proto(status)
    assert msg.table_version == 7
    assert msg.actors[0].name == "e0" and msg.actors[0].load == 0.5
    assert msg.actors[0].details["slots"] == "[1, 2]"
    assert msg.details["nodes"] == "2"


def test_admin_and_metrics_results():
    assert admin_to_proto({"message": "ok", "table_version": 3, "moved": 4}).details["moved"] == "4"
    metrics = metrics_to_proto({"metrics": [{"name": "ttft_s", "value": 0.1, "labels": {"actor": "g0"}}]})
    assert metrics.metrics[0].labels["actor"] == "g0"


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ((("authorization", "Bearer s3cret"),), True),
        ((("authorization", "Bearer wrong"),), False),
        ((("authorization", "s3cret"),), False),
        ((), False),
    ],
)
def test_bearer_token_check(metadata, ok):
    assert BearerTokenInterceptor("s3cret")._authorized(metadata) is ok
