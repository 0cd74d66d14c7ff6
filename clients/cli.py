"""The `moeray` command: serve a model, generate from it, and operate a running deployment.

    moeray serve [--config FILE] [--model PATH] [--host H] [--port 50051] [--ray-address ADDR]
    moeray generate PROMPT [--address HOST:PORT] [--max-tokens N] [--temperature T] [--seed S]
    moeray status | scale GROUP N | drain ACTOR | rebalance | metrics   [--address HOST:PORT]
    moeray bench [--quick] [--model PATH] [--rates 1,2,4,inf] ...   (the serving benchmark, in-process)

Client commands take the token from --token, --token-file or $MOERAY_TOKEN and the address from --address
or $MOERAY_ADDRESS. Exit codes: 0 done, 1 the server refused or failed the request, 2 bad command line,
3 no server reachable (reported within ~10 s), 130 interrupted. `serve` and `bench` import the server side
(Ray, torch) only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moeray.clients.client import ADMIN_TOKEN_ENV, DEFAULT_PORT, TOKEN_ENV, MoerayClient, RetryPolicy
from moeray.clients.messages import ServerUnavailableError
from moeray.common.errors import MoerayError

ADDRESS_ENV = "MOERAY_ADDRESS"
DEBUG_ENV = "MOERAY_DEBUG"  # set to get tracebacks instead of one-line errors
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 3, 130


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, a dashed rule under the header."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Client commands


def _token(value: str | None, path: Path | None) -> str | None:
    if value is None and path is not None:
        return path.expanduser().read_text().strip()
    return value


def _client(args: argparse.Namespace) -> MoerayClient:
    return MoerayClient(
        args.address,
        token=_token(args.token, args.token_file),
        admin_token=_token(args.admin_token, args.admin_token_file),
        tls=args.tls,
        root_certificates=args.tls_ca,
        tls_server_name=args.tls_server_name,
        retry=RetryPolicy(timeout_s=args.connect_timeout),
        allow_plaintext_token=args.insecure,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "cache_salt": args.cache_salt,
    }
    last = None
    with _client(args) as client:
        for chunk in client.generate(prompt, **params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
    sys.stdout.write("\n")
    if args.verbose and last is not None and last.usage is not None:
        u = last.usage
        print(
            f"[{last.finish_reason}] prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), generated "
            f"{u.completion_tokens} tokens, first token {u.time_to_first_token_s:.3f} s, total {u.total_s:.3f} s",
            file=sys.stderr,
        )
    return EXIT_OK


def _mib(weight_bytes: str | None) -> str:
    """An expert actor's weight bytes as MiB; empty for actors that hold none (gating, KV shards)."""
    return f"{int(weight_bytes) / 2**20:.1f} MiB" if weight_bytes else ""


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    rows = [(a.name, a.kind, a.node, a.device, a.details.get("dtype", ""), a.details.get("transport", ""), a.health,
             f"{a.load:g}", _mib(a.details.get("weight_bytes")), a.details.get("off_cpu_s", "")) for a in status.actors]
    print(f"routing table version {status.table_version}")
    print(format_table(["ACTOR", "KIND", "NODE", "DEVICE", "DTYPE", "TRANSPORT", "HEALTH", "LOAD", "WEIGHTS",
                        "OFF-CPU S"], rows))
    for key, value in sorted(status.details.items()):
        print(f"{key}: {value}")
    return EXIT_OK


def _print_admin(result) -> int:
    print(result.message or "done")
    if result.table_version:
        print(f"routing table version {result.table_version}")
    if result.details:
        print(format_table(["KEY", "VALUE"], sorted(result.details.items())))
    return EXIT_OK


def cmd_scale(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_admin(client.scale(args.group, args.replicas))


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_admin(client.drain(args.actor))


def cmd_rebalance(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_admin(client.rebalance())


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        metrics = client.metrics()
    rows = [(m.name, ",".join(f"{k}={v}" for k, v in sorted(m.labels.items())), f"{m.value:g}") for m in metrics]
    print(format_table(["METRIC", "LABELS", "VALUE"], rows))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from moeray.actors.serve import run_server  # the server side needs Ray and torch; clients do not

    return run_server(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from moeray.bench.serving import run  # deploys the model in-process: needs Ray, torch, transformers

    return run(args)


# ---------------------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _client_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV, f"localhost:{DEFAULT_PORT}"),
        help=f"server HOST:PORT (default: ${ADDRESS_ENV} or localhost:{DEFAULT_PORT})",
    )
    group.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default: ${TOKEN_ENV})")
    group.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    group.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                       help=f"admin token for scale / drain / rebalance (default: ${ADMIN_TOKEN_ENV})")
    group.add_argument("--admin-token-file", type=Path, help="read the admin token from this file")
    group.add_argument("--insecure", action="store_true",
                       help="allow sending a token without TLS to a server on another machine")
    group.add_argument("--tls", action="store_true", help="use TLS, verifying the server with the system's CAs")
    group.add_argument("--tls-ca", type=Path, help="PEM file of the CA that signed the server's cert (turns TLS on)")
    group.add_argument("--tls-server-name", help="name to verify in the server's cert, when it is not the host")
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up on an unreachable server after S seconds (default: 10)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description="Serve Mixture-of-Experts models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_flags()

    serve = sub.add_parser("serve", help="bring up moeray and serve gRPC until Ctrl-C or SIGTERM")
    serve.add_argument("--config", type=Path, help="YAML file: engine, frontend, host, port, ray_address")
    serve.add_argument("--model", help="model folder (config.json + safetensors); default: the embedded demo model")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="serving dtype (default auto: bfloat16 where the device computes it fast, else float32)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_positive_int, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--ray-address", help="join this Ray cluster (e.g. auto); default: start a local Ray")
    serve.add_argument("--http-port", type=_positive_int, help="also serve the HTTP API on this port")
    serve.add_argument("--strict-api", action="store_true", default=None,
                       help="HTTP API: refuse unknown request fields (default: ignore them as vLLM does, and list "
                       "them in the x-moeray-ignored-fields response header)")
    serve.add_argument("--token-file", type=Path, help=f"require this bearer token (default: ${TOKEN_ENV} if set)")
    serve.add_argument("--admin-token-file", type=Path,
                       help=f"require this token for scale / drain / rebalance (default: ${ADMIN_TOKEN_ENV} if set)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow listening on a non-loopback address without a token")
    serve.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); needs --tls-key")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--max-in-flight", type=_positive_int, help="requests admitted at once (default 256)")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", parents=[client], help="stream a completion to the terminal")
    gen.add_argument("prompt", help='prompt text, or "-" to read it from stdin')
    gen.add_argument("--model", default="", help="model name (default: the server's only model)")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=float, help="0 = greedy (server default 1.0)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int, help="same seed, same output")
    gen.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--cache-salt", help="reuse only cached prefixes of requests with this salt (1-256 chars; "
                                          "a per-tenant secret, vLLM's cache_salt)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print finish reason and timings to stderr")
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("status", parents=[client], help="table of the deployment's actors").set_defaults(func=cmd_status)
    scale = sub.add_parser("scale", parents=[client], help="set an expert group's replica count")
    scale.add_argument("group")
    scale.add_argument("replicas", type=_positive_int)
    scale.set_defaults(func=cmd_scale)
    drain = sub.add_parser("drain", parents=[client], help="retire an actor after its in-flight work")
    drain.add_argument("actor")
    drain.set_defaults(func=cmd_drain)
    sub.add_parser("rebalance", parents=[client], help="re-place experts from the measured load").set_defaults(
        func=cmd_rebalance
    )
    sub.add_parser("metrics", parents=[client], help="table of the deployment's metrics").set_defaults(func=cmd_metrics)

    from moeray.bench.serving import add_arguments as add_bench_arguments  # stdlib-only at import

    bench = sub.add_parser("bench", help="serving benchmark: moeray vs transformers (and vLLM), JSON + PNGs")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ServerUnavailableError as e:
        print(f"moeray: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (MoerayError, NotImplementedError, OSError, ValueError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"moeray: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("moeray: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
