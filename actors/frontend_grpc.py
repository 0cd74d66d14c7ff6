"""The gRPC servicers: thin `grpc.aio` handlers that convert at the edge (frontend_wire) and call the front end's
request logic (frontend_core). Errors become status codes through `frontend_wire.status_for`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

import moeray
from moeray.actors.frontend_backend import Backend
from moeray.actors.frontend_core import Frontend
from moeray.actors.frontend_wire import (
    UndecodableRequest,
    admin_to_proto,
    metrics_to_proto,
    model_infos,
    parse_generate_bytes,
    request_to_dict,
    response_to_proto,
    status_for,
    status_to_proto,
)
from moeray.clients.proto import moeray_pb2 as pb
from moeray.clients.proto import moeray_pb2_grpc as pb_grpc
from moeray.common.api import RequestValidationError

logger = logging.getLogger(__name__)

MOERAY_SERVICE = pb.DESCRIPTOR.services_by_name["Moeray"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


def request_dict(msg: pb.GenerateRequest | UndecodableRequest) -> dict[str, Any]:
    """The parsed wire request as the dict the front end validates; a request protobuf could not parse is
    rejected naming its field."""
    if isinstance(msg, UndecodableRequest):
        raise RequestValidationError(msg.message, [msg.message.partition(":")[0]])
    return request_to_dict(msg)


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
            validated = self._frontend.validate(request_dict(request))
            async with aclosing(self._frontend.generate(validated)) as stream:
                async for delta in stream:
                    yield response_to_proto(delta)
        except Exception as e:
            await _abort_for(context, e)

    async def Complete(self, request, context):
        try:
            validated = self._frontend.validate(request_dict(request))
            out = pb.CompleteResponse()
            async with aclosing(self._frontend.generate(validated)) as stream:
                async for delta in stream:
                    chunk = response_to_proto(delta)
                    out.request_id = chunk.request_id
                    out.text += chunk.text
                    out.token_ids.extend(chunk.token_ids)
                    out.logprobs.extend(chunk.logprobs)
                    out.top_logprobs.extend(chunk.top_logprobs)
                    out.prompt_logprobs.extend(chunk.prompt_logprobs)
                    out.finish_reason = chunk.finish_reason
                    if chunk.HasField("usage"):
                        out.usage.CopyFrom(chunk.usage)
            return out
        except Exception as e:
            await _abort_for(context, e)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=model_infos(self._frontend.models.values()))

    async def ServerInfo(self, request, context):
        fe = self._frontend
        return pb.ServerInfoResponse(
            version=moeray.__version__,
            models=model_infos(fe.models.values()),
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


def moeray_handler(servicer: MoerayServicer) -> grpc.GenericRpcHandler:
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
