"""The `moeray` command line: clear failures, tables, argument checks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from moeray.clients.cli import EXIT_UNREACHABLE, build_parser, format_table, main


def closed_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_exits_nonzero_within_about_ten_seconds():
    address = closed_address()
    commands = [["status"], ["generate", "hello"], ["scale", "g0", "2"]]
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moeray.clients.cli", *cmd, "--address", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = [p.communicate(timeout=60) for p in procs]
    elapsed = time.monotonic() - start
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == EXIT_UNREACHABLE
        assert f"cannot reach a moeray server at {address}" in stderr
        assert "Traceback" not in stderr
    assert elapsed < 20.0  # 10 s budget each, run side by side, plus interpreter start-up


def test_table_columns_line_up():
    table = format_table(["A", "LONG"], [("xx", 1), ("y", 22)])
    lines = table.splitlines()
    assert lines[0] == "A   LONG"
    assert lines[1] == "--  ----"
    assert lines[2] == "xx  1"
    assert lines[3] == "y   22"


@pytest.mark.parametrize(
    "argv",
    [["scale", "g0", "-1"], ["scale", "g0"], ["drain"], ["generate"], ["bogus"], [], ["serve", "--port", "-1"]],
)
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


def test_generate_defaults(monkeypatch):
    monkeypatch.setenv("MOERAY_ADDRESS", "example:1")
    monkeypatch.setenv("MOERAY_TOKEN", "t")
    args = build_parser().parse_args(["generate", "hi", "--stop", "a", "--stop", "b", "--seed", "3"])
    assert (args.address, args.token, args.stop, args.seed, args.max_tokens) == ("example:1", "t", ["a", "b"], 3, 128)


def test_serve_refuses_a_public_address_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("MOERAY_TOKEN", raising=False)
    monkeypatch.delenv("MOERAY_ADMIN_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "--token-file" in err and "--insecure" in err


def test_client_refuses_a_plaintext_token_to_another_machine():
    from moeray.clients.client import MoerayClient

    with pytest.raises(ValueError, match="plaintext"):
        MoerayClient("10.1.2.3:50051", token="s3cret")
    MoerayClient("10.1.2.3:50051", token="s3cret", allow_plaintext_token=True).close()
    MoerayClient("127.0.0.1:50051", token="s3cret").close()  # loopback: fine
    MoerayClient("[::1]:50051", admin_token="root").close()
