"""The layering of docs/architecture.md, read from the source with `ast` (import-linter finds packages by location,
and the package-dir mapping puts `moeray` in common/_root, so it would need an install of its own).

    common  ->  router, experts, kvstore  ->  models  ->  engine  ->  actors  ->  clients, bench, scripts

Imports only point down (or within a package); router, experts and kvstore do not import each other; `ray` is
imported only in actors/ and bench/; the client library (clients/) imports, at module level, nothing of moeray but
clients and common, so it installs without torch or ray. One exception: the front end (actors/) speaks the wire
schema, moeray.clients.proto.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {"common": 0, "router": 1, "experts": 1, "kvstore": 1, "models": 2, "engine": 3, "actors": 4,
        "clients": 5, "bench": 5, "scripts": 5}
SIBLINGS_APART = {"router", "experts", "kvstore"}  # same rank, independent
RAY_ALLOWED = {"actors", "bench"}
WIRE_SCHEMA = "moeray.clients.proto"


def modules():
    for pkg in RANK:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "_pb2" not in path.name:
                yield pkg, path


def imports(path: Path, module_level_only: bool = False):
    """(imported module, line) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_top_level_package_has_a_rank():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests"} <= set(RANK), packages - set(RANK)


def test_imports_only_point_down():
    bad = []
    for pkg, path in modules():
        for name, line in imports(path):
            parts = name.split(".")
            if parts[0] != "moeray" or len(parts) < 2 or parts[1] not in RANK or parts[1] == pkg:
                continue
            target = parts[1]
            if pkg == "actors" and name.startswith(WIRE_SCHEMA):
                continue
            up = RANK[target] > RANK[pkg]
            across = RANK[target] == RANK[pkg] and {pkg, target} <= SIBLINGS_APART
            if up or across:
                bad.append(f"{where(path, line)} ({pkg}) imports {name} ({target})")
    assert bad == []


def test_ray_only_in_actors_and_bench():
    bad = [f"{where(path, line)} imports {name}" for pkg, path in modules() if pkg not in RAY_ALLOWED
           for name, line in imports(path) if name.split(".")[0] == "ray"]
    assert bad == []


@pytest.mark.parametrize("heavy", ["torch", "ray", "numpy"])
def test_client_library_imports_no_server_side_at_module_level(heavy):
    bad = []
    for path in sorted((ROOT / "clients").glob("*.py")):
        for name, line in imports(path, module_level_only=True):
            parts = name.split(".")
            server_side = parts[0] == "moeray" and len(parts) > 1 and parts[1] not in ("clients", "common")
            if parts[0] == heavy or server_side:
                bad.append(f"{where(path, line)} imports {name}")
    assert bad == []


def test_the_checker_sees_a_violation(tmp_path):
    # the rules above can fail: an engine module importing the actors is caught
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom moeray.actors.deploy import deploy\n")
    found = [n for n, _ in imports(bad) if n.startswith("moeray.") and RANK[n.split(".")[1]] > RANK["engine"]]
    assert found == ["moeray.actors.deploy"]
