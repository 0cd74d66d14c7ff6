"""Serving the app: uvicorn on a socket we bind, a body-size limit in front, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

import uvicorn

from moeray.actors.frontend import Backend, Frontend, FrontendConfig
from moeray.actors.http.app import OpenAIApp
from moeray.actors.http.chat import ChatTemplate, model_dir
from moeray.actors.http.schemas import APIError

logger = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused (413) as soon as it is known, before it is all read."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"body: larger than {self.limit} bytes; send a shorter prompt", "invalid_request_error")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big.response()(scope, receive, send)
        size = 0
        started = False

        async def limited_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def limited_receive():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    raise _TooBig()
            return message

        try:
            await self.app(scope, limited_receive, limited_send)
        except _TooBig:
            if not started:
                await too_big.response()(scope, receive, send)


class _TooBig(Exception):
    pass


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the caller (moeray serve) owns SIGINT and SIGTERM and stops us itself


class HTTPServer:
    """A started HTTP API. `stop(grace)` turns /health to 503, stops accepting, lets requests finish."""

    def __init__(self, server: _Server, task: asyncio.Task, app: OpenAIApp) -> None:
        self.uvicorn_server, self._task, self.app = server, task, app

    @property
    def frontend(self) -> Frontend:
        return self.app.frontend

    async def stop(self, grace: float | None = None) -> None:
        grace = self.app.frontend.config.grace_s if grace is None else grace
        self.app.stopping = True
        # uvicorn needs a moment to close idle keep-alive connections even when nothing is in flight
        self.uvicorn_server.config.timeout_graceful_shutdown = max(grace, 0.2)
        self.uvicorn_server.should_exit = True
        await self._task
        for task in list(self.app.tasks):
            task.cancel()


def _listen(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None


async def serve_http(
    backends: Sequence[Backend],
    host: str = "127.0.0.1",
    port: int = 0,
    config: FrontendConfig | None = None,
    *,
    frontend: Frontend | None = None,
    strict_api: bool | None = None,
) -> tuple[HTTPServer, int]:
    """Start the HTTP API over `backends` on the running loop; port 0 picks a free port.

    Pass the gRPC server's `frontend` to share its in-flight bound and request ids; otherwise one is made
    from `config`. Auth (the bearer token) and TLS (cert and key) come from `config`. `strict_api` refuses
    unknown request fields (default: config.strict_api). Returns (server, port).
    """
    config = frontend.config if frontend is not None else (config or FrontendConfig())
    token = config.resolve_token()
    if frontend is None:
        tls = config.tls_cert_path is not None
        frontend = Frontend(list(backends), config, auth_required=token is not None, tls=tls)
    templates = {}
    for name, model_backends in frontend.model2backends.items():
        templates[name] = ChatTemplate.from_model_dir(model_dir(model_backends[0]))
    strict = getattr(config, "strict_api", False) if strict_api is None else strict_api
    app = OpenAIApp(frontend, token, templates, strict=strict)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    ssl = {}
    if config.tls_cert_path is not None:
        ssl = {"ssl_certfile": str(config.tls_cert_path.expanduser()),
               "ssl_keyfile": str(config.tls_key_path.expanduser())}
    asgi = BodyLimit(app.fastapi(), config.max_message_bytes)
    uv_config = uvicorn.Config(asgi, lifespan="off", log_level="warning", access_log=False,
                               timeout_graceful_shutdown=config.grace_s, **ssl)
    server = _Server(uv_config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises why it failed
            raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
        await asyncio.sleep(0.01)
    logger.info("moeray HTTP API on %s:%d (auth %s, tls %s, strict %s)", host, bound, bool(token), bool(ssl), strict)
    return HTTPServer(server, task, app), bound
