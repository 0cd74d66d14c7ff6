"""The front end's plain functions (actors/frontend_*.py) that need no server: parsing, errors, picking, admin."""

from __future__ import annotations

import grpc
import pytest

from moeray.actors.frontend_auth import BearerTokenInterceptor
from moeray.actors.frontend_core import Admission, order_by_load
from moeray.actors.frontend_wire import (
    UndecodableRequest,
    admin_to_proto,
    metrics_to_proto,
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


GEN, STATUS, SCALE = "/moeray.v1.Moeray/Generate", "/moeray.v1.Admin/Status", "/moeray.v1.Admin/Scale"
OK, UNAUTH, DENIED = None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [(bearer("s3cret"), OK), (bearer("wrong"), UNAUTH), ((("authorization", "s3cret"),), UNAUTH), ((), UNAUTH)],
)
def test_bearer_token_check(metadata, expected):
    refusal = BearerTokenInterceptor("s3cret").check(GEN, metadata)
    assert (refusal[0] if refusal else None) == expected


@pytest.mark.parametrize(
    ("method", "metadata", "expected"),
    [
        (GEN, bearer("user"), OK),
        (GEN, bearer("root"), OK),  # the admin token may do anything
        (STATUS, bearer("user"), OK),  # reading status needs either token
        (SCALE, bearer("user"), DENIED),  # the inference token cannot change the deployment
        (SCALE, bearer("root"), OK),
        (SCALE, (), UNAUTH),
        ("/grpc.health.v1.Health/Check", (), OK),
    ],
)
def test_admin_token_is_kept_apart(method, metadata, expected):
    refusal = BearerTokenInterceptor("user", "root").check(method, metadata)
    assert (refusal[0] if refusal else None) == expected


def test_without_an_admin_token_admin_writes_are_refused_and_say_how_to_fix():
    code, message = BearerTokenInterceptor("user").check(SCALE, bearer("user"))
    assert code == DENIED and "--admin-token-file" in message


def test_admin_token_alone_leaves_inference_open():
    assert BearerTokenInterceptor(None, "root").check(GEN, ()) is None
    assert BearerTokenInterceptor(None, "root").check(SCALE, ())[0] == UNAUTH
