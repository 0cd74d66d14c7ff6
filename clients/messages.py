"""Typed results and errors of the moeray client, and their conversion from and to the wire messages.

Needs grpcio and protobuf only (no torch, no ray), like the rest of moeray.clients apart from `serve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from moeray.clients.proto import moeray_pb2 as pb
from moeray.common.api import Usage
from moeray.common.errors import CapacityError, MoerayError, RequestCancelledError, RequestError

# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed message: the text and tokens added since the previous one."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk: "length" | "stop" | "eos" | "cancelled" | "error"
    usage: Usage | None  # set on the last chunk
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, most likely first
    # when asked for (on the first chunk): per prompt position None (the first) or (logprob, rank, top)
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage | None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_context: int
    vocab_size: int


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str
    models: list[ModelInfo]
    num_backends: int
    max_in_flight: int
    num_in_flight: int
    auth_required: bool
    tls: bool


@dataclass(frozen=True, slots=True)
class ActorStatus:
    name: str
    kind: str
    node: str
    device: str
    health: str
    load: float
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    table_version: int
    actors: list[ActorStatus]
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdminResult:
    message: str
    table_version: int
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


def build_request(
    prompt: str | Sequence[int],
    *,
    model: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    request_id: str = "",
    min_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_tokens: int | None = None,
    logit_bias: dict[int, float] | None = None,
    top_logprobs: int | None = None,
    structured: dict[str, str] | None = None,
    include_stop_str_in_output: bool = False,
    skip_special_tokens: bool | None = None,
    prompt_logprobs: int | None = None,
    cache_salt: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; a str prompt is sent as text, a sequence of ints as prompt_token_ids.

    Parameters left None take the server's defaults. Nothing is validated here: the server is the judge.
    structured: {"kind": "json" | "regex" | "choice" | "grammar", "value": str}. cache_salt: reuse only the cached
    prefixes of requests with the same salt (a per-tenant secret; vLLM's cache_salt).
    """
    request = pb.GenerateRequest(
        model=model,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        request_id=request_id,
        logit_bias=dict(logit_bias or {}),
        include_stop_str_in_output=include_stop_str_in_output,
    )
    if structured is not None:
        request.structured.CopyFrom(pb.StructuredOutput(kind=structured["kind"], value=structured["value"]))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    optional = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                "min_p": min_p, "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "repetition_penalty": repetition_penalty, "min_tokens": min_tokens, "top_logprobs": top_logprobs,
                "skip_special_tokens": skip_special_tokens, "prompt_logprobs": prompt_logprobs,
                "cache_salt": cache_salt}
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    return request


def _usage(msg) -> Usage | None:
    if not msg.HasField("usage"):
        return None
    u = msg.usage
    return Usage(u.prompt_tokens, u.completion_tokens, u.time_to_first_token_s, u.total_s, u.cached_tokens)


def _top(msg) -> list[list[tuple[int, float]]]:
    return [list(zip(t.token_ids, t.logprobs, strict=True)) for t in msg.top_logprobs]


def _prompt(msg) -> list[tuple[float, int, list[tuple[int, float]]] | None] | None:
    if not msg.prompt_logprobs:
        return None
    return [None] + [(e.logprob, e.rank, list(zip(e.top.token_ids, e.top.logprobs, strict=True)))
                     for e in msg.prompt_logprobs]


def chunk_from_proto(msg: pb.GenerateResponse) -> GenerateChunk:
    return GenerateChunk(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=list(msg.logprobs),
        finish_reason=msg.finish_reason or None,
        usage=_usage(msg),
        top_logprobs=_top(msg),
        prompt_logprobs=_prompt(msg),
    )


def completion_from_proto(msg: pb.CompleteResponse) -> Completion:
    return Completion(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=list(msg.logprobs),
        finish_reason=msg.finish_reason,
        usage=_usage(msg),
        top_logprobs=_top(msg),
        prompt_logprobs=_prompt(msg),
    )


def models_from_proto(models) -> list[ModelInfo]:
    return [ModelInfo(m.name, m.max_context, m.vocab_size) for m in models]


def server_info_from_proto(msg: pb.ServerInfoResponse) -> ServerInfo:
    return ServerInfo(
        version=msg.version,
        models=models_from_proto(msg.models),
        num_backends=msg.num_backends,
        max_in_flight=msg.max_in_flight,
        num_in_flight=msg.num_in_flight,
        auth_required=msg.auth_required,
        tls=msg.tls,
    )


def status_from_proto(msg: pb.StatusResponse) -> ClusterStatus:
    actors = [ActorStatus(a.name, a.kind, a.node, a.device, a.health, a.load, dict(a.details)) for a in msg.actors]
    return ClusterStatus(msg.table_version, actors, dict(msg.details))


def admin_from_proto(msg: pb.AdminResponse) -> AdminResult:
    return AdminResult(msg.message, msg.table_version, dict(msg.details))


def metrics_from_proto(msg: pb.MetricsResponse) -> list[Metric]:
    return [Metric(m.name, m.value, dict(m.labels)) for m in msg.metrics]


# ---------------------------------------------------------------------------------------------------------
# Errors


class MoerayClientError(MoerayError):
    """A call failed; `code` is the gRPC status code's name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequestError(MoerayClientError, RequestError):
    """The server rejected the request; the message names the field to change."""


class ServerBusyError(MoerayClientError, CapacityError):
    """Too many requests in flight on the server (or a message over its size limit); retry later."""


class AuthenticationError(MoerayClientError, PermissionError):
    """Missing or wrong bearer token."""


class ServerUnavailableError(MoerayClientError, ConnectionError):
    """No server answered at the address, after retrying."""


class DeadlineExceededError(MoerayClientError, TimeoutError):
    """The call's deadline passed before the server finished."""


class CancelledError(MoerayClientError, RequestCancelledError):
    """The call was cancelled."""


_CODE2ERROR: dict[grpc.StatusCode, type[MoerayClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def translate_error(error: grpc.RpcError, address: str) -> MoerayClientError:
    """A gRPC error -> the matching MoerayClientError, its message prefixed with the server address."""
    code = error.code()
    details = error.details() or code.name
    cls = _CODE2ERROR.get(code, MoerayClientError)
    return cls(f"server {address} answered {code.name}: {details}", code.name)


def unreachable(address: str, waited_s: float, last: str | None = None) -> ServerUnavailableError:
    reason = f"; last error: {last}" if last else ""
    return ServerUnavailableError(
        f"cannot reach a moeray server at {address} (gave up after {waited_s:.1f} s{reason}); check the "
        "address and that `moeray serve` is running there",
        "UNAVAILABLE",
    )
