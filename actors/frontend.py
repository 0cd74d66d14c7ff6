"""The gRPC front end's server: build it over backends, start it, stop it gracefully.

The front end is split by responsibility:
    frontend_config.py   FrontendConfig (limits, tokens, TLS)
    frontend_backend.py  the Backend contract (what serves a model)
    frontend_core.py     request logic: validation, admission, tokenization, backend choice, streaming
    frontend_wire.py     gRPC messages <-> internal types, errors -> status codes (the servicer edge only)
    frontend_grpc.py     the servicers
    frontend_auth.py     bearer tokens, TLS credentials
    frontend.py          this: the server's lifecycle (health NOT_SERVING, then a graceful stop)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeray.actors.frontend_auth import BearerTokenInterceptor, server_credentials
from moeray.actors.frontend_backend import Backend
from moeray.actors.frontend_config import FrontendConfig
from moeray.actors.frontend_core import LONG_PROMPT_CHARS, Frontend, TextDelta, Usage
from moeray.actors.frontend_grpc import ADMIN_SERVICE, MOERAY_SERVICE, AdminServicer, MoerayServicer, moeray_handler
from moeray.actors.frontend_wire import request_to_dict
from moeray.clients.proto import moeray_pb2_grpc as pb_grpc

# what the other front end (actors/http) and callers import from here
__all__ = ["LONG_PROMPT_CHARS", "Backend", "Frontend", "FrontendConfig", "FrontendServer", "TextDelta", "Usage",
           "request_to_dict", "serve_frontend"]

logger = logging.getLogger(__name__)


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


async def serve_frontend(
    backends: Sequence[Backend],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    config: FrontendConfig | None = None,
) -> tuple[FrontendServer, int]:
    """Start the gRPC front end over `backends`; port 0 picks a free port. Returns (server, bound port)."""
    config = config or FrontendConfig()
    token, admin_token = config.resolve_token(), config.resolve_admin_token()
    credentials = server_credentials(config)
    frontend = Frontend(list(backends), config, auth_required=token is not None, tls=credentials is not None)
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(token, admin_token)] if token or admin_token else [],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
        ],
    )
    server.add_generic_rpc_handlers([moeray_handler(MoerayServicer(frontend))])
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
    logger.info("moeray front end on %s:%d (auth %s, admin token %s, tls %s)", host, bound, bool(token),
                bool(admin_token), bool(credentials))
    return FrontendServer(server, health_servicer, frontend), bound
