"""The gRPC front end: thin `grpc.aio` servicers over plain functions.

A request's life here: parse (a string field holding invalid UTF-8 is named, not dropped) -> validate
(common.api) -> admit (bounded, else RESOURCE_EXHAUSTED) -> tokenize -> pick the least-loaded backend serving
the model (another one is tried if it is unavailable before the first token) -> stream step deltas as text
deltas -> on any early exit (client gone, deadline, stop string, shutdown) cancel the request in the backend
so it frees its blocks. Errors become gRPC status codes in one place, `status_for`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import moeray
from moeray.clients.proto import moeray_pb2 as pb
from moeray.clients.proto import moeray_pb2_grpc as pb_grpc
from moeray.common.api import (
    Backend,
    FrontendConfig,
    GenerateRequest,
    ModelSpec,
    RequestValidationError,
    TextStream,
    parse_generate_request,
    to_sampling_params,
    validate_prompt_length,
)
from moeray.common.errors import (
    BackendUnavailableError,
    CapacityError,
    ExpertUnavailableError,
    RequestCancelledError,
    RequestError,
)
from moeray.common.sampling import SamplingParams, StepDelta
from moeray.router.affinity import order_by_affinity

logger = logging.getLogger(__name__)

MOERAY_SERVICE = pb.DESCRIPTOR.services_by_name["Moeray"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
LONG_PROMPT_CHARS = 16384  # tokenize longer prompts off the event loop
CANCEL_TIMEOUT_S = 10.0
OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "top_logprobs")


# ---------------------------------------------------------------------------------------------------------
# Parsing and errors


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


class DuplicateRequestError(RequestError):
    """A request with this request_id is already in flight."""


# ---------------------------------------------------------------------------------------------------------
# Request handling


class Admission:
    """A bounded count of requests in flight; the event loop is single-threaded, so a plain counter."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.num_in_flight = 0

    def try_acquire(self) -> bool:
        if self.num_in_flight >= self.limit:
            return False
        self.num_in_flight += 1
        return True

    def release(self) -> None:
        assert self.num_in_flight > 0
        self.num_in_flight -= 1


def order_by_load(backends: Sequence[Backend], tie_break: int) -> list[Backend]:
    """Least loaded first; equal loads rotate with tie_break so they share the work."""
    n = len(backends)
    return [backends[i] for i in sorted(range(n), key=lambda i: (backends[i].load(), (i - tie_break) % n))]


async def _open_stream(backend: Backend, request_id: str, prompt_ids: list[int], params: SamplingParams):
    stream = backend.generate(request_id, prompt_ids, params)
    if inspect.isawaitable(stream):  # an `async def` returning an iterator rather than an async generator
        stream = await stream
    return stream


async def _cancel_quietly(backend: Backend, request_id: str) -> None:
    # Shielded so a second cancellation of the handler cannot abandon it; bounded so a dead backend cannot hang
    # the handler. The request is over for the client either way.
    try:
        await asyncio.wait_for(asyncio.shield(backend.cancel(request_id)), CANCEL_TIMEOUT_S)
    except Exception:
        logger.exception("cancelling request %s failed", request_id)


async def _close_stream(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing a backend stream failed")


@dataclass
class Frontend:
    """State the servicers share: the backends by model, the admission bound, the requests in flight."""

    backends: list[Backend]
    config: FrontendConfig
    auth_required: bool = False
    tls: bool = False
    models: dict[str, ModelSpec] = field(default_factory=dict)
    model2backends: dict[str, list[Backend]] = field(default_factory=dict)
    request_ids: set[str] = field(default_factory=set)
    id_prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("the front end needs at least one backend")
        self.admission = Admission(self.config.max_in_flight)
        for b in self.backends:
            if not isinstance(b, Backend):
                raise TypeError(f"{type(b).__name__} does not implement moeray.common.api.Backend")
            spec = ModelSpec(name=b.model_name, max_context=b.max_context, vocab_size=b.vocab_size)
            if self.models.setdefault(spec.name, spec) != spec:
                raise ValueError(f"backends for model {spec.name!r} disagree: {self.models[spec.name]} vs {spec}")
            self.model2backends.setdefault(spec.name, []).append(b)

    def validate(self, msg: pb.GenerateRequest | UndecodableRequest) -> GenerateRequest:
        if isinstance(msg, UndecodableRequest):
            raise RequestValidationError(msg.message, [msg.message.partition(":")[0]])
        return parse_generate_request(request_to_dict(msg), self.models, max_prompt_bytes=self.config.max_prompt_bytes)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream one validated request; the last message has finish_reason and usage."""
        arrival_s = time.monotonic()
        client_id = request.request_id or uuid.uuid4().hex
        request_id = f"{self.id_prefix}:{client_id}"
        if request_id in self.request_ids:
            raise DuplicateRequestError(f"request_id: {client_id!r} is already in flight; use another id")
        if not self.admission.try_acquire():
            raise CapacityError(f"server busy: {self.admission.limit} requests already in flight; retry later")
        self.request_ids.add(request_id)
        try:
            async for response in self._run(request, request_id, client_id, arrival_s):
                yield response
        finally:
            self.request_ids.discard(request_id)
            self.admission.release()

    async def _run(self, request: GenerateRequest, request_id: str, client_id: str, arrival_s: float):
        backends = self.model2backends[request.model]
        prompt_ids = await self._tokenize(request, backends[0])
        validate_prompt_length(request, len(prompt_ids), self.models[request.model])
        params = to_sampling_params(request)
        backend, stream, delta = await self._start(backends, request_id, prompt_ids, params)
        text = TextStream(backend.detokenize, request.stop)
        num_tokens, first_token_s, backend_done = 0, None, False
        try:
            while True:
                backend_done = delta.finish_reason is not None
                num_tokens += len(delta.token_ids)
                if first_token_s is None and delta.token_ids:
                    first_token_s = time.monotonic()
                piece = text.push(delta.token_ids)
                finish = "stop" if text.stopped else delta.finish_reason
                if finish:
                    piece += text.flush()
                response = pb.GenerateResponse(
                    request_id=client_id, text=piece, token_ids=delta.token_ids, finish_reason=finish or ""
                )
                if request.logprobs and delta.logprobs:
                    response.logprobs.extend(delta.logprobs)
                for top in delta.top_logprobs or []:
                    response.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[v for _, v in top])
                if finish:
                    now = time.monotonic()
                    response.usage.CopyFrom(
                        pb.Usage(
                            prompt_tokens=len(prompt_ids),
                            completion_tokens=num_tokens,
                            time_to_first_token_s=(first_token_s or now) - arrival_s,
                            total_s=now - arrival_s,
                            cached_tokens=delta.num_cached_tokens,
                        )
                    )
                yield response
                if finish:
                    return
                delta = await _next_delta(stream, backend)
        finally:
            await _close_stream(stream)
            if not backend_done:
                await _cancel_quietly(backend, request_id)

    async def _tokenize(self, request: GenerateRequest, backend: Backend) -> list[int]:
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        if len(request.prompt) > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(backend.tokenize, request.prompt)
        return backend.tokenize(request.prompt)

    async def _start(self, backends: list[Backend], request_id: str, prompt_ids: list[int], params):
        """Open the stream on the least-loaded backend that produces a first delta; fail over until one does."""
        last_error: BaseException | None = None
        # cache-aware: the actor most likely to hold this prompt's prefix, bounded by load (router/affinity.py)
        order = order_by_affinity(backends, prompt_ids) if len(backends) > 1 else backends
        for backend in order:
            stream = None
            try:
                stream = await _open_stream(backend, request_id, prompt_ids, params)
                return backend, stream, await _next_delta(stream, backend)
            except BackendUnavailableError as e:
                logger.warning("backend unavailable for %s, trying another: %s", request_id, e)
                last_error = e
                await _close_stream(stream)
                await _cancel_quietly(backend, request_id)
            except BaseException:
                await _close_stream(stream)
                await _cancel_quietly(backend, request_id)
                raise
        raise BackendUnavailableError(f"no backend for model could serve the request: {last_error}")

    async def first_answer(self, call: Callable[[Backend], Awaitable[dict]]) -> dict:
        """Ask the backends in turn (status and admin ops); the first that is reachable answers."""
        last_error: BaseException | None = None
        for backend in self.backends:
            try:
                return await call(backend)
            except BackendUnavailableError as e:
                last_error = e
        raise BackendUnavailableError(f"no backend answered: {last_error}")


async def _next_delta(stream: Any, backend: Backend) -> StepDelta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise BackendUnavailableError(f"{type(backend).__name__} ended a stream without a finish reason") from None


def model_infos(frontend: Frontend) -> list[pb.ModelInfo]:
    return [
        pb.ModelInfo(name=s.name, max_context=s.max_context, vocab_size=s.vocab_size) for s in frontend.models.values()
    ]


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


# ---------------------------------------------------------------------------------------------------------
# Servicers: translate between the wire and the functions above


async def _abort_for(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, grpc.aio.AbortError):  # already answered
        raise error
    code = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=error)
    await context.abort(code, str(error) or type(error).__name__)


class MoerayServicer(pb_grpc.MoerayServicer):
    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend

    async def Generate(self, request, context):
        try:
            validated = self._frontend.validate(request)
            async with aclosing(self._frontend.generate(validated)) as stream:
                async for response in stream:
                    yield response
        except Exception as e:
            await _abort_for(context, e)

    async def Complete(self, request, context):
        try:
            validated = self._frontend.validate(request)
            out = pb.CompleteResponse()
            async with aclosing(self._frontend.generate(validated)) as stream:
                async for chunk in stream:
                    out.request_id = chunk.request_id
                    out.text += chunk.text
                    out.token_ids.extend(chunk.token_ids)
                    out.logprobs.extend(chunk.logprobs)
                    out.top_logprobs.extend(chunk.top_logprobs)
                    out.finish_reason = chunk.finish_reason
                    if chunk.HasField("usage"):
                        out.usage.CopyFrom(chunk.usage)
            return out
        except Exception as e:
            await _abort_for(context, e)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=model_infos(self._frontend))

    async def ServerInfo(self, request, context):
        fe = self._frontend
        return pb.ServerInfoResponse(
            version=moeray.__version__,
            models=model_infos(fe),
            num_backends=len(fe.backends),
            max_in_flight=fe.admission.limit,
            num_in_flight=fe.admission.num_in_flight,
            auth_required=fe.auth_required,
            tls=fe.tls,
        )


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend

    async def _call(self, context, op: Callable[[Backend], Awaitable[dict]], convert):
        try:
            return convert(await self._frontend.first_answer(op))
        except Exception as e:
            await _abort_for(context, e)

    async def Status(self, request, context):
        return await self._call(context, lambda b: b.status(), status_to_proto)

    async def Scale(self, request, context):
        if not request.group:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "group: required, e.g. `moeray scale g0 2`")
        op = lambda b: b.admin("scale", group=request.group, replicas=request.replicas)  # noqa: E731
        return await self._call(context, op, admin_to_proto)

    async def Drain(self, request, context):
        if not request.actor:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "actor: required; see `moeray status`")
        return await self._call(context, lambda b: b.admin("drain", actor=request.actor), admin_to_proto)

    async def Rebalance(self, request, context):
        return await self._call(context, lambda b: b.admin("rebalance"), admin_to_proto)

    async def Metrics(self, request, context):
        return await self._call(context, lambda b: b.admin("metrics"), metrics_to_proto)


def _moeray_handler(servicer: MoerayServicer) -> grpc.GenericRpcHandler:
    """Like the generated add_MoerayServicer_to_server, with a request parser that names bad UTF-8 fields."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_generate_bytes,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete,
            request_deserializer=parse_generate_bytes,
            response_serializer=pb.CompleteResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "ServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ServerInfo,
            request_deserializer=pb.ServerInfoRequest.FromString,
            response_serializer=pb.ServerInfoResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(MOERAY_SERVICE, handlers)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects Moeray and Admin calls without `authorization: Bearer <token>`; health checks stay open."""

    def __init__(self, token: str, protected: Sequence[str] = (MOERAY_SERVICE, ADMIN_SERVICE)) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{service}/" for service in protected)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _denying(handler)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    message = "missing or wrong bearer token; pass --token or set MOERAY_TOKEN"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    if handler.unary_unary:
        return handler._replace(unary_unary=deny_unary)
    if handler.unary_stream:
        return handler._replace(unary_stream=deny_stream)
    if handler.stream_unary:
        return handler._replace(stream_unary=deny_unary)
    return handler._replace(stream_stream=deny_stream)


# ---------------------------------------------------------------------------------------------------------
# Server


class FrontendServer:
    """A started front end. `stop(grace)` turns health to NOT_SERVING, then lets in-flight calls finish."""

    def __init__(self, server: grpc.aio.Server, health_servicer, frontend: Frontend) -> None:
        self.grpc_server = server
        self.frontend = frontend
        self._health = health_servicer

    async def stop(self, grace: float | None = None) -> None:
        await self._health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.frontend.config.grace_s if grace is None else grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


def _server_credentials(config: FrontendConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert_path is None:
        return None
    key = config.tls_key_path.expanduser().read_bytes()
    cert = config.tls_cert_path.expanduser().read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


async def serve_frontend(
    backends: Sequence[Backend],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    config: FrontendConfig | None = None,
) -> tuple[FrontendServer, int]:
    """Start the gRPC front end over `backends`; port 0 picks a free port. Returns (server, bound port)."""
    config = config or FrontendConfig()
    token = config.resolve_token()
    credentials = _server_credentials(config)
    frontend = Frontend(list(backends), config, auth_required=token is not None, tls=credentials is not None)
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(token)] if token else [],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
        ],
    )
    server.add_generic_rpc_handlers([_moeray_handler(MoerayServicer(frontend))])
    pb_grpc.add_AdminServicer_to_server(AdminServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [MOERAY_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)

    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from None
    await server.start()
    for name in ["", MOERAY_SERVICE, ADMIN_SERVICE]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("moeray front end on %s:%d (auth %s, tls %s)", host, bound, bool(token), bool(credentials))
    return FrontendServer(server, health_servicer, frontend), bound
