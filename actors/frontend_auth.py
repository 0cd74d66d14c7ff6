"""Who may call: bearer tokens (inference and admin kept apart) and TLS credentials for the gRPC server."""

from __future__ import annotations

import hmac

import grpc

from moeray.actors.frontend_config import FrontendConfig
from moeray.actors.frontend_grpc import ADMIN_SERVICE, MOERAY_SERVICE

ADMIN_WRITES = ("Scale", "Drain", "Rebalance")  # Admin methods that change the deployment


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` checks; health checks stay open.

    Moeray (inference) calls need the inference token when one is set (the admin token works too). Admin's
    Status and Metrics need either token. Admin's Scale, Drain and Rebalance need the admin token: with only an
    inference token configured they are refused (PERMISSION_DENIED), so the token clients hold cannot change
    the deployment. With no token at all everything is open (loopback development)."""

    def __init__(self, token: str | None, admin_token: str | None = None) -> None:
        self._token = f"Bearer {token}".encode() if token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata or ())
        return handler if refusal is None else _denying(handler, *refusal)

    def check(self, full_method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go ahead, else the (status code, message) to refuse it with."""
        service, _, method = full_method.strip("/").partition("/")
        given = _bearer(metadata)
        if service == MOERAY_SERVICE:
            accepted = [t for t in (self._token, self._admin) if t] if self._token else []
        elif service == ADMIN_SERVICE and method in ADMIN_WRITES:
            if self._admin is None and self._token is not None:
                return (grpc.StatusCode.PERMISSION_DENIED,
                        f"{method} needs the admin token, and this server has none: start it with "
                        "--admin-token-file (or $MOERAY_ADMIN_TOKEN)")
            accepted = [self._admin] if self._admin else []
        elif service == ADMIN_SERVICE:
            accepted = [t for t in (self._token, self._admin) if t]
        else:
            return None  # health, reflection
        if not accepted or any(given is not None and hmac.compare_digest(given, t) for t in accepted):
            return None
        if given is not None and self._token is not None and hmac.compare_digest(given, self._token):
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs the admin token; the inference token cannot change the deployment")
        which = "admin token (--admin-token or $MOERAY_ADMIN_TOKEN)" if method in ADMIN_WRITES else (
            "bearer token (--token or $MOERAY_TOKEN)")
        return grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {which}"


def _bearer(metadata) -> bytes | None:
    for key, value in metadata:
        if key == "authorization":
            return value.encode() if isinstance(value, str) else value
    return None


def _denying(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code`."""

    async def deny_unary(request, context):
        await context.abort(code, message)

    async def deny_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    if handler.unary_unary:
        return handler._replace(unary_unary=deny_unary)
    if handler.unary_stream:
        return handler._replace(unary_stream=deny_stream)
    if handler.stream_unary:
        return handler._replace(stream_unary=deny_unary)
    return handler._replace(stream_stream=deny_stream)


def server_credentials(config: FrontendConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert_path is None:
        return None
    key = config.tls_key_path.expanduser().read_bytes()
    cert = config.tls_cert_path.expanduser().read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
