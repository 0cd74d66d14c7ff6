"""engine/channel.py: the expert-call channel's framing, ordering, errors, token check and lost connections
(server and client in this process, over a real Unix socket and TCP)."""

import socket
import threading
import time

import numpy as np
import pytest
import torch

from moeray.engine.channel import ChannelClient, ChannelClosed, ChannelServer, RemoteCallError, wait_readable
from moeray.engine.wire import call_buffers, decode_answer, decode_call, encode_answer


def echo_times(scale: float):
    """A handler like the expert actor's: decode the call, answer rows * scale * weight of the first pair."""
    def handler(layer, meta, rows):
        x, pair_rows, expert_ids, weights = decode_call(rows, meta)
        if layer < 0:
            raise ValueError(f"layer {layer} is not served here")
        w = weights[0] if weights.numel() else 1.0
        return encode_answer(x * scale * w + layer)
    return handler


def call(client, layer, x, w=1.0):
    p = torch.arange(x.shape[0])
    rows, meta = call_buffers(x, p, torch.zeros_like(p), torch.full((x.shape[0],), w))
    return client.call(layer, meta, rows)


def result(client, fut, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not fut.done() and time.monotonic() < deadline:
        wait_readable([client], 0.1)
    return fut.result(timeout=0)


@pytest.fixture()
def server():
    s = ChannelServer(echo_times(2.0), host="127.0.0.1")
    yield s
    s.close()


@pytest.mark.parametrize("local", [True, False], ids=["unix", "tcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answers_in_the_wire_dtype_and_in_order(server, local, dtype):
    c = ChannelClient(server.address(), local=local)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, 64, generator=g).to(dtype) for m in (1, 3, 16, 0, 200)]
    futs = [call(c, i, x, 0.5) for i, x in enumerate(xs)]  # pipelined: all sent before any is read
    for i, (x, f) in enumerate(zip(xs, futs, strict=True)):
        out = decode_answer(result(c, f))
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, x * 2.0 * torch.tensor(0.5).to(dtype) + i)
    assert c.pending == {}
    c.close()


def test_large_pipelined_calls_do_not_deadlock(server):
    """Calls far larger than the socket buffers, several in flight before the caller reads any answer."""
    c = ChannelClient(server.address(), local=True)
    x = torch.ones(2048, 1024)  # 8 MiB per call and per answer
    futs = [call(c, 1, x) for _ in range(4)]
    for f in futs:
        assert torch.equal(decode_answer(result(c, f, 30.0)), x * 2.0 + 1)


def test_handler_error_fails_only_that_call(server):
    c = ChannelClient(server.address(), local=True)
    bad, good = call(c, -1, torch.ones(2, 8)), call(c, 3, torch.ones(2, 8))
    with pytest.raises(RemoteCallError, match="layer -1 is not served here"):
        result(c, bad)
    assert torch.equal(decode_answer(result(c, good)), torch.full((2, 8), 5.0))
    assert not c.closed


def test_wrong_token_is_refused(server):
    addr = {**server.address(), "token": "00" * 32}
    c = ChannelClient(addr, local=True)
    f = call(c, 0, torch.ones(1, 8))
    with pytest.raises(ChannelClosed):
        result(c, f)
    assert c.closed and server.calls == 0


def test_lost_server_fails_pending_calls():
    release = threading.Event()

    def slow(layer, meta, rows):
        release.wait(5)
        return encode_answer(torch.zeros(1, 8))

    s = ChannelServer(slow)
    c = ChannelClient(s.address(), local=True)
    f = call(c, 0, torch.ones(1, 8))
    s.close()  # the process behind it gone: its connections shut down
    release.set()
    with pytest.raises(ChannelClosed):
        result(c, f)
    assert c.closed
    with pytest.raises(ChannelClosed):  # a closed client fails new calls at once
        call(c, 0, torch.ones(1, 8)).result(timeout=0)


def test_no_reachable_address_is_a_clear_error(server):
    with pytest.raises(ChannelClosed, match="no reachable channel address"):
        ChannelClient({**server.address(), "tcp": None}, local=False)


def test_unix_socket_lives_in_a_private_directory(server):
    import os
    import stat

    mode = stat.S_IMODE(os.stat(os.path.dirname(server.uds_path)).st_mode)
    assert mode == 0o700
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.uds_path)  # reachable by this user
    s.close()


def test_sweep_removes_only_the_directories_of_gone_servers(tmp_path):
    import os

    from moeray.engine.channel import DIR_PREFIX, SOCKET_NAME, sweep_stale_dirs

    def socket_dir(name, listening):
        d = tmp_path / f"{DIR_PREFIX}{name}"
        d.mkdir()
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / SOCKET_NAME))
        if listening:
            s.listen(1)
            return d, s
        s.close()  # what a SIGKILLed server leaves: the socket file, nobody listening
        return d, None

    dead, _ = socket_dir("dead", listening=False)
    live, listener = socket_dir("live", listening=True)
    starting = tmp_path / f"{DIR_PREFIX}starting"  # no socket yet, just made: a server starting up
    starting.mkdir()
    old_empty = tmp_path / f"{DIR_PREFIX}old"
    old_empty.mkdir()
    os.utime(old_empty, (0, 0))
    other = tmp_path / "not-ours"
    other.mkdir()
    try:
        assert sorted(sweep_stale_dirs(str(tmp_path))) == sorted([str(dead), str(old_empty)])
        assert live.exists() and starting.exists() and other.exists() and not dead.exists()
    finally:
        listener.close()


def test_call_buffers_match_encode_call():
    from moeray.engine.wire import encode_call

    x = torch.randn(5, 16).to(torch.bfloat16)
    p = torch.tensor([0, 1, 1, 4])
    e, w = torch.tensor([3, 1, 2, 0]), torch.rand(4)
    rows, meta = call_buffers(x, p, e, w)
    assert isinstance(rows, np.ndarray)
    assert (rows.tobytes(), meta) == encode_call(x, p, e, w)


@pytest.mark.parametrize("tt", ["socket", "nixl"])
def test_a_tensor_transport_without_ray_is_refused_naming_the_field(tt):
    from pydantic import ValidationError

    from moeray.common.config import ServeConfig

    with pytest.raises(ValidationError, match=f"tensor_transport: {tt} needs transport: ray"):
        ServeConfig(model="m", transport="local", tensor_transport=tt)
    assert ServeConfig(model="m", tensor_transport="socket").tensor_transport == "socket"
