"""`moeray serve`: bring the system up, serve gRPC (and HTTP) until Ctrl-C or SIGTERM, then shut down.

The config file (`--config`, YAML) holds ServeConfig fields at the top level plus these serving keys:

    model: /models/deepseek-v3        # ServeConfig fields ...
    num_expert_groups: 4
    host: 0.0.0.0                     # ... and the serving keys
    port: 50051
    http_port: 8000                   # also serve the OpenAI-compatible HTTP API
    ray_address: auto
    frontend:                         # moeray.actors.frontend_config.FrontendConfig
      max_in_flight: 256
      auth_token_path: ~/.moeray/grpc_token
      tls_cert_path: ~/.moeray/tls/server.crt
      tls_key_path: ~/.moeray/tls/server.key

Command-line flags win over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeray.actors.frontend import Backend, FrontendConfig, serve_frontend
from moeray.common.config import ServeConfig
from moeray.common.errors import ConfigError

logger = logging.getLogger(__name__)

TOKEN_ENV = "MOERAY_TOKEN"
ADMIN_TOKEN_ENV = "MOERAY_ADMIN_TOKEN"
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


class ServeOptions(BaseModel):
    """Everything `moeray serve` needs: the engine's config and how to expose it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: ServeConfig
    frontend: FrontendConfig = FrontendConfig()
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    ray_address: str | None = None
    http_port: int | None = Field(None, ge=0, le=65535)
    insecure: bool = False  # serve a non-loopback address without a token


SERVING_KEYS = ("frontend", "host", "port", "ray_address", "http_port", "insecure")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_exposure(options: ServeOptions) -> None:
    """Refuse to serve a non-loopback address without a token, unless `insecure` says so."""
    if not is_loopback(options.host) and not options.frontend.has_auth and not options.insecure:
        raise ConfigError(f"host: {options.host} is reachable from other machines and no token is set: anyone could "
                          "generate, scale or drain. Pass --token-file (and --admin-token-file), set $MOERAY_TOKEN, "
                          "or --insecure on a trusted network")


def load_options(args: argparse.Namespace) -> ServeOptions:
    """Merge the config file (if any) with the command-line flags; raise ConfigError naming bad fields."""
    data: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.exists():
            raise ConfigError(f"config file {args.config} does not exist")
        data = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a mapping at the top level")
    serving = {k: data.pop(k) for k in SERVING_KEYS if k in data}
    engine_flags = {"model": args.model or None, "dtype": getattr(args, "dtype", None)}
    engine = ServeConfig.build(**{**data, **{k: v for k, v in engine_flags.items() if v is not None}})
    frontend = dict(serving.get("frontend") or {})
    overrides = {
        "auth_token_path": args.token_file,
        "admin_token_path": getattr(args, "admin_token_file", None),
        "tls_cert_path": args.tls_cert,
        "tls_key_path": args.tls_key,
        "max_in_flight": args.max_in_flight,
        "strict_api": getattr(args, "strict_api", None),
    }
    frontend.update({k: v for k, v in overrides.items() if v is not None})
    if "auth_token" not in frontend and "auth_token_path" not in frontend and os.environ.get(TOKEN_ENV):
        frontend["auth_token"] = os.environ[TOKEN_ENV]
    if "admin_token" not in frontend and "admin_token_path" not in frontend and os.environ.get(ADMIN_TOKEN_ENV):
        frontend["admin_token"] = os.environ[ADMIN_TOKEN_ENV]
    flags = {"host": args.host, "port": args.port, "ray_address": args.ray_address, "http_port": args.http_port,
             "insecure": getattr(args, "insecure", False) or None}
    serving.update({k: v for k, v in flags.items() if v is not None})
    try:
        options = ServeOptions(engine=engine, frontend=FrontendConfig(**frontend), **serving)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid serve options: {problems}") from None
    check_exposure(options)
    return options


def build_backends(options: ServeOptions) -> tuple[list[Backend], Callable[[], None]]:
    """Deploy the engine and return one Backend per gating actor, plus the function that tears it all down.

    Called inside the serving event loop, so backends may create asyncio objects bound to it.
    """
    from moeray.actors.backend import backends_for
    from moeray.actors.deploy import deploy

    dep = deploy(options.engine, address=options.ray_address)  # prints progress while weights load
    return backends_for(dep), dep.shutdown


async def serve(options: ServeOptions, stop_signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)):
    """Build the backends, serve until one of stop_signals arrives, then stop gracefully and shut down.

    With `http_port` set, the OpenAI-compatible HTTP API runs beside gRPC on the same loop and shares its front
    end: the same backends, bearer token, TLS and in-flight bound.
    """
    if not is_loopback(options.host) and not options.frontend.has_auth:
        logger.warning("listening on %s without a bearer token (--insecure): anyone who reaches it can use it",
                       options.host)
    backends, shutdown = build_backends(options)
    try:
        server, port = await serve_frontend(backends, options.host, options.port, config=options.frontend)
        servers = [server]
        names = ", ".join(sorted({b.model_name for b in backends}))
        print(f"moeray: serving {names} on {options.host}:{port} (Ctrl-C to stop)", flush=True)
        if options.http_port is not None:
            from moeray.actors.http import serve_http

            try:
                http, http_port = await serve_http(backends, options.host, options.http_port, frontend=server.frontend)
            except BaseException:
                await server.stop(0)
                raise
            servers.append(http)
            print(f"moeray: OpenAI-compatible HTTP API on http://{options.host}:{http_port}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in stop_signals:
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"moeray: stopping; in-flight requests get {options.frontend.grace_s:g} s to finish", flush=True)
        await asyncio.gather(*(s.stop(options.frontend.grace_s) for s in servers))
    finally:
        shutdown()


def run_server(args: argparse.Namespace) -> int:
    """Entry point of `moeray serve`; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = load_options(args)
    asyncio.run(serve(options))
    return 0
