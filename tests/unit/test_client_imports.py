"""The client side installs light: no torch, no ray, no grpcio-tools; the committed stubs match moeray.proto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "ray", "grpc_tools")
IMPORT_WITH_BLOCKER = """
import json, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the client must not need it")

sys.meta_path.insert(0, Blocker())
import moeray.clients.cli, moeray.clients.client, moeray.clients.messages, moeray.clients.proto.moeray_pb2_grpc
print(json.dumps([m for m in BLOCKED if m in sys.modules]))
"""


def test_client_and_cli_import_without_torch_ray_or_grpc_tools():
    code = f"BLOCKED = {BLOCKED!r}\n" + IMPORT_WITH_BLOCKER
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_public_names():
    from moeray.clients.client import AsyncMoerayClient, GenerateChunk, MoerayClient, ServerUnavailableError

    assert issubclass(ServerUnavailableError, ConnectionError)
    assert callable(MoerayClient.generate) and callable(AsyncMoerayClient.generate)
    assert "finish_reason" in GenerateChunk.__dataclass_fields__


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_committed_stubs_match_the_proto(tmp_path):
    import importlib.util

    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    from google.protobuf import descriptor_pb2

    from moeray.clients.proto import moeray_pb2

    proto_dir = ROOT / "clients" / "proto"
    out = tmp_path / "moeray.desc"
    # protoc in a process of its own: its extension links its own C++ protobuf, and where another library has put
    # one in this process's global symbol scope first (a NIXL agent's libprotobuf 31, after the RDT tests), loading
    # it dies with SIGSEGV in its static initializers
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}",
                           "moeray.proto"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto()
    moeray_pb2.DESCRIPTOR.CopyToProto(committed)
    _clear_json_names(fresh.message_type)  # protoc adds derived json names; the embedded descriptor omits them
    assert committed == fresh, "run `python scripts/gen_proto.py` and commit the stubs"


def test_service_stub_uses_a_package_import():
    text = (ROOT / "clients" / "proto" / "moeray_pb2_grpc.py").read_text()
    assert "\nimport moeray_pb2" not in text
    assert "from . import moeray_pb2" in text
