"""cluster.yaml and docs/cluster-onprem.yaml: valid for Ray's cluster launcher, and secure by default.

The checks run on the config as `ray up` sees it (after Ray merges its provider defaults), so a command list
left out of our file, which would fall back to Ray's default (dashboard on 0.0.0.0), fails here.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

util = pytest.importorskip("ray.autoscaler._private.util")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "cluster.yaml", ROOT / "docs" / "cluster-onprem.yaml"]
SECRETS = {  # where each secret lands on the nodes
    "~/.ray/auth_token": "Ray's cluster token",
    "~/.moeray/grpc_token": "the front end's bearer token",
    "~/.moeray/tls": "the front end's TLS key and certificate",
}


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def config(request) -> dict:
    raw = yaml.safe_load(request.param.read_text())
    prepared = util.prepare_config(raw)
    util.validate_config(prepared)
    return prepared


def _commands(config: dict) -> list[str]:
    names = ["setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"]
    names += ["head_start_ray_commands", "worker_start_ray_commands"]
    commands = [c for name in names for c in config.get(name, [])]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("worker_setup_commands", [])
    return commands


def _ray_starts(config: dict) -> list[str]:
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2, "one `ray start` for the head, one for workers"
    return starts


def test_validates_with_rays_own_checks(config):
    assert config["head_node_type"] in config["available_node_types"]


def test_token_auth_on_every_node(config):
    for command in _ray_starts(config):
        assert "RAY_AUTH_MODE=token" in command, command
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command, command


def test_dashboard_and_job_api_stay_on_localhost(config):
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    for command in _commands(config):
        assert "0.0.0.0" not in command or "moeray serve" in command, command
        assert "--ray-debugger-external" not in command


def test_front_end_requires_token_and_tls(config):
    serve = [c for c in config["head_start_ray_commands"] if "moeray serve" in c]
    assert len(serve) == 1
    for flag in ("--token-file", "--tls-cert", "--tls-key"):
        assert flag in serve[0]
    assert "RAY_AUTH_MODE=token" in serve[0]  # the driver joins the token-protected cluster


def test_secrets_come_from_the_operators_home_not_the_repository(config):
    mounts = config["file_mounts"]
    for remote, what in SECRETS.items():
        assert remote in mounts, f"{what} is not copied to the nodes"
        assert mounts[remote].startswith("~/"), f"{what} must come from outside the repository"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [p for p in tracked if Path(p).name in ("auth_token", "grpc_token") or p.endswith(".key")]


def test_json_in_commands_is_quoted(config):
    for command in _commands(config):
        assert isinstance(command, str), f"YAML read a command as {type(command).__name__}: quote it"
        for word in shlex.split(command, comments=False):
            _, _, value = word.partition("=")
            if value.startswith("{"):
                json.loads(value)  # an unquoted JSON argument would have been split at its spaces


def test_cloud_config_has_gpu_and_npu_expert_types():
    config = util.prepare_config(yaml.safe_load(CONFIGS[0].read_text()))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    npu = [t for t in types.values() if t["resources"].get("NPU", 0) > 0]
    assert head["resources"].get("moeray_head") == 1
    assert gpu and npu
    for node_type in gpu + npu:
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sum(t["min_workers"] for t in types.values()) <= config["max_workers"]


def test_workers_install_moeray(config):
    install = [c for c in _commands(config) if "pip install" in c and "moeray-src" in c]
    assert install
    for node_type in config["available_node_types"].values():
        overrides = node_type.get("worker_setup_commands")
        if overrides is not None:  # a per-type list replaces the global one: it must install moeray too
            assert any("moeray-src" in c for c in overrides)
