"""The gRPC wire <-> the front end's own types, used only at the servicer edge.

Requests: bytes -> GenerateRequest message (a string field holding invalid UTF-8 is named, not dropped) -> the
dict common.api validates. Answers: TextDelta -> GenerateResponse, status / admin / metrics dicts -> their
messages. Errors -> gRPC status codes in one place, `status_for`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from moeray.actors.frontend_core import TextDelta
from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.api import ModelSpec
from moeray.common.errors import (
    BackendUnavailableError,
    CapacityError,
    ExpertUnavailableError,
    RequestCancelledError,
    RequestError,
)

OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "top_logprobs", "skip_special_tokens",
                   "prompt_logprobs", "cache_salt")


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Stands in for a request protobuf could not parse, so the servicer can answer INVALID_ARGUMENT."""

    message: str


@functools.cache
def _bytes_view_class() -> type:
    """GenerateRequest with every string field declared bytes (the same wire format), to find bad UTF-8."""
    src = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(src)
    view = descriptor_pb2.FileDescriptorProto(name="moeray_bytes_view.proto", package="moeray.bytesview")
    view.syntax = src.syntax
    for m in src.message_type:  # all of them: GenerateRequest refers to others (StructuredOutput, map entries)
        view.message_type.add().CopyFrom(m)
    for m in view.message_type:
        for f in [*m.field, *(f for nested in m.nested_type for f in nested.field)]:
            if f.type_name:
                f.type_name = f.type_name.replace(".moeray.v1.", ".moeray.bytesview.")
    msg = next(m for m in view.message_type if m.name == "GenerateRequest")
    for f in msg.field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(view)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("moeray.bytesview.GenerateRequest"))


def parse_generate_bytes(data: bytes) -> pb.GenerateRequest | UndecodableRequest:
    """The request deserializer: a GenerateRequest, or an UndecodableRequest naming the field at fault."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        reason = str(e)
    try:
        view = _bytes_view_class().FromString(data)
    except DecodeError:
        return UndecodableRequest(f"request: not a valid GenerateRequest message ({reason})")
    for f in view.DESCRIPTOR.fields:
        if f.type != f.TYPE_BYTES:  # only the fields the wire API declares as string
            continue
        values = getattr(view, f.name)
        repeated = not isinstance(values, bytes)
        for i, value in enumerate(values if repeated else [values]):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as u:
                where = f"{f.name}[{i}]" if repeated else f.name
                return UndecodableRequest(f"{where}: not valid UTF-8 (bad byte at offset {u.start})")
    return UndecodableRequest(f"request: could not be parsed ({reason})")


def request_to_dict(msg: pb.GenerateRequest) -> dict[str, Any]:
    """Wire request -> the dict common.api validates; unset optional fields keep their defaults."""
    data: dict[str, Any] = {
        "model": msg.model,
        "prompt": msg.prompt,
        "prompt_token_ids": list(msg.prompt_token_ids),
        "stop": list(msg.stop),
        "stop_token_ids": list(msg.stop_token_ids),
        "ignore_eos": msg.ignore_eos,
        "logprobs": msg.logprobs,
        "request_id": msg.request_id,
        "logit_bias": dict(msg.logit_bias),
        "include_stop_str_in_output": msg.include_stop_str_in_output,
    }
    if msg.HasField("structured"):
        data["structured"] = {"kind": msg.structured.kind, "value": msg.structured.value}
    for name in OPTIONAL_FIELDS:
        if msg.HasField(name):
            data[name] = getattr(msg, name)
    return data


def status_for(error: BaseException) -> grpc.StatusCode:
    """The one place errors become gRPC status codes."""
    if isinstance(error, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, BackendUnavailableError | ExpertUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, RequestCancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


def response_to_proto(delta: TextDelta) -> pb.GenerateResponse:
    """One step of a request, as GenerateResponse (usage only on the last)."""
    response = pb.GenerateResponse(request_id=delta.request_id, text=delta.text, token_ids=delta.token_ids,
                                   finish_reason=delta.finish_reason or "", logprobs=delta.logprobs)
    for top in delta.top_logprobs:
        response.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[v for _, v in top])
    for entry in (delta.prompt_logprobs or [])[1:]:  # the first position has none
        lp, rank, top = entry
        response.prompt_logprobs.add(logprob=lp, rank=rank, top=pb.TopLogprobs(token_ids=[t for t, _ in top],
                                                                            logprobs=[v for _, v in top]))
    if delta.usage is not None:
        u = delta.usage
        response.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         time_to_first_token_s=u.time_to_first_token_s, total_s=u.total_s,
                                         cached_tokens=u.cached_tokens))
    return response


def model_infos(models: Iterable[ModelSpec]) -> list[pb.ModelInfo]:
    return [pb.ModelInfo(name=s.name, max_context=s.max_context, vocab_size=s.vocab_size) for s in models]


def status_to_proto(status: dict[str, Any]) -> pb.StatusResponse:
    """Backend.status() -> StatusResponse; keys without a field of their own go to `details` as text."""
    known = ("name", "kind", "node", "device", "health", "load")
    actors = []
    for actor in status.get("actors", []):
        actors.append(
            pb.ActorStatus(
                name=str(actor.get("name", "")),
                kind=str(actor.get("kind", "")),
                node=str(actor.get("node", "")),
                device=str(actor.get("device", "")),
                health=str(actor.get("health", "")),
                load=float(actor.get("load", 0.0)),
                details={k: str(v) for k, v in actor.items() if k not in known},
            )
        )
    details = {k: str(v) for k, v in status.items() if k not in ("actors", "table_version")}
    return pb.StatusResponse(table_version=int(status.get("table_version", 0)), actors=actors, details=details)


def admin_to_proto(result: dict[str, Any]) -> pb.AdminResponse:
    details = {k: str(v) for k, v in result.items() if k not in ("message", "table_version")}
    return pb.AdminResponse(
        message=str(result.get("message", "")),
        table_version=int(result.get("table_version", 0)),
        details=details,
    )


def metrics_to_proto(result: dict[str, Any]) -> pb.MetricsResponse:
    metrics = [
        pb.Metric(
            name=str(m["name"]),
            value=float(m["value"]),
            labels={k: str(v) for k, v in m.get("labels", {}).items()},
        )
        for m in result.get("metrics", [])
    ]
    return pb.MetricsResponse(metrics=metrics)
