"""Generate the Python gRPC stubs in clients/proto/ from clients/proto/moeray.proto.

    python scripts/gen_proto.py           # (re)write moeray_pb2.py, moeray_pb2_grpc.py, moeray_pb2.pyi
    python scripts/gen_proto.py --check   # exit 1 when the committed stubs differ from a fresh generation

Needs grpcio-tools (a test extra); the generated files need only grpcio and protobuf. protoc writes
`import moeray_pb2` into the service module, which only works with clients/proto on sys.path; it is
rewritten to a package-relative import so the stubs work as `moeray.clients.proto`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "clients" / "proto"
PROTO_NAME = "moeray.proto"
GENERATED = ("moeray_pb2.py", "moeray_pb2_grpc.py", "moeray_pb2.pyi")
RUFF_SKIP = "# ruff: noqa\n"  # generated code; not ours to restyle


def run_protoc(out_dir: Path) -> None:
    """Run grpcio-tools' bundled protoc over moeray.proto, writing the three stub files into out_dir."""
    from grpc_tools import protoc  # a dev dependency, imported only here

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_NAME),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_DIR / PROTO_NAME}")


def postprocess(text: str) -> str:
    """`import moeray_pb2 as x` -> `from . import moeray_pb2 as x` (package-relative); tell ruff to skip the file."""
    text = re.sub(r"^import (moeray_pb2\w*) as (\w+)$", r"from . import \1 as \2", text, flags=re.M)
    return text if text.startswith(RUFF_SKIP) else RUFF_SKIP + text


def generate(out_dir: Path) -> dict[str, str]:
    """Generate the stubs into out_dir and return {file name: fixed text}."""
    run_protoc(out_dir)
    texts = {}
    for name in GENERATED:
        path = out_dir / name
        texts[name] = postprocess(path.read_text())
        path.write_text(texts[name])
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs, write nothing")
    args = parser.parse_args(argv)
    if not args.check:
        generate(PROTO_DIR)
        print(f"wrote {', '.join(GENERATED)} in {PROTO_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = [name for name, text in fresh.items() if (PROTO_DIR / name).read_text() != text]
    if stale:
        print(f"stale: {', '.join(stale)}; run `python scripts/gen_proto.py`", file=sys.stderr)
        return 1
    print("stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
