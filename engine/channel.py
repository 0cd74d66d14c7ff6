"""Expert-call channel: the rows and answers of expert calls over a direct socket, no Ray on the per-layer path.

Why: on Ray every expert call is a task submission, a scheduling hop and a result object; on the 2-core boxes this
project measures on an empty 4-actor fan-out costs 1-4 ms and ~0.5 ms of actor CPU per call, more than a small
batch's expert math. Serving systems keep Ray (or another launcher) for placement, health and control, and move
the per-step data over a channel of their own (vLLM's shared-memory/ZMQ message queue between its workers). Here a
round trip of 16 KB over a Unix socket between two Python processes measured ~70 us (vs ~1.1 ms for an empty Ray
actor call). The expert actor opens a ChannelServer; the gating actor's transport (actors/channel.py) connects
with the address and token it gets from the actor over Ray, which stays the control plane: probes, restarts,
slot loading, status.

Transport: a Unix socket (same node: a fresh 0700 directory per server) or TCP (other nodes; TCP_NODELAY). Every
connection starts with the server's 32-byte token (given out only over Ray's authenticated control plane, compared
in constant time); a wrong token closes the connection.

Frames (little endian):
  call    <Q request id> <i layer> <I meta bytes> <Q rows bytes>  meta  rows     (engine/wire.call_buffers)
  answer  <Q request id> <q status> <Q payload bytes>  payload                  (status 0: encode_answer's bytes;
                                                                                1: the handler's error, utf-8)
Calls on one connection are answered in order by one worker thread per server (the calls of all connections are
served one at a time, as Ray's default concurrency does for `forward`); a reader thread per connection always drains
incoming calls into the worker's queue, so a sender never blocks on a server that is busy answering. (Computing
in the reader thread instead can deadlock: with two large calls in flight on one connection, the server blocks
sending an answer the client is not reading while the client blocks sending its next call. Tried once: it hung
with two micro-batches at B = 64, whose prefill calls carry up to ~256 KB of rows.)
Legend: none.
"""

from __future__ import annotations

import atexit
import hmac
import os
import queue
import secrets
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

CALL = struct.Struct("<QiIQ")
ANSWER = struct.Struct("<QqQ")
TOKEN_BYTES = 32
OK, ERROR = 0, 1

Handler = Callable[[int, bytearray, bytearray], bytes]  # (layer, meta, rows) -> answer bytes


class ChannelClosed(ConnectionError):
    """The connection to an expert actor's channel is gone (the process died, or the connection broke)."""


class RemoteCallError(RuntimeError):
    """The expert actor's handler raised for this call (its own error, not a lost connection)."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """n bytes from sock (blocking, within its timeout) into a fresh writable buffer; ChannelClosed on EOF."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ChannelClosed("connection closed by the peer")
        got += k
    return buf


def send_parts(sock: socket.socket, parts: list[Any]) -> None:
    """Send buffers back to back without joining them (sendmsg, resumed after partial writes)."""
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


DIR_PREFIX = "moeray-ch-"
SOCKET_NAME = "experts.sock"
_EMPTY_DIR_GRACE_S = 60.0  # a directory with no socket yet may be a server starting up


def sweep_stale_dirs(parent: str) -> list[str]:
    """Remove the socket directories of servers that are gone (a SIGKILLed actor leaves its directory and an empty
    socket file): ours, and either the socket refuses connections (nobody listens) or there has been no socket for
    a minute. A live server's socket accepts, so it is never touched. Returns what was removed."""
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(DIR_PREFIX)]
    except OSError:
        return removed
    for name in names:
        d = os.path.join(parent, name)
        try:
            st = os.stat(d)
            if st.st_uid != os.getuid():
                continue
            path = os.path.join(d, SOCKET_NAME)
            if os.path.exists(path):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(1.0)  # a full backlog: no answer in time is kept, as any other doubt
                try:
                    probe.connect(path)
                    continue  # someone listens
                except ConnectionRefusedError:
                    pass
                finally:
                    probe.close()
            elif time.time() - st.st_mtime < _EMPTY_DIR_GRACE_S:
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class ChannelServer:
    """Serves `handler(layer, meta, rows) -> answer bytes` on a Unix socket and a TCP port. `host`: the address to
    bind TCP on (the node's IP); None: Unix socket only. `close()` stops it; `address()` is what a client
    needs (and must only travel over an authenticated channel: it holds the token)."""

    def __init__(self, handler: Handler, host: str | None = None, init: Callable[[], None] | None = None) -> None:
        self.handler = handler
        self._init = init  # run first on the worker thread (per-thread settings: torch's intra-op thread count)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        # a Unix socket path is limited to ~107 bytes: under a long TMPDIR, /tmp
        parent = tempfile.gettempdir() if len(tempfile.gettempdir()) < 64 else "/tmp"
        sweep_stale_dirs(parent)  # what killed servers left (atexit never ran there)
        self._dir = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent)
        os.chmod(self._dir, 0o700)
        atexit.register(shutil.rmtree, self._dir, True)
        self.uds_path = os.path.join(self._dir, SOCKET_NAME)
        self._listeners = [self._listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), self.uds_path)]
        self.tcp: tuple[str, int] | None = None
        if host is not None:
            tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listeners.append(self._listen(tcp, (host, 0)))
            self.tcp = (host, tcp.getsockname()[1])
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.calls = 0
        for lst in self._listeners:
            threading.Thread(target=self._accept, args=(lst,), name="moeray-channel-accept", daemon=True).start()
        threading.Thread(target=self._worker, name="moeray-channel-worker", daemon=True).start()

    @staticmethod
    def _listen(sock: socket.socket, where: Any) -> socket.socket:
        sock.bind(where)
        sock.listen(64)
        return sock

    def address(self) -> dict[str, Any]:
        return {"uds": self.uds_path, "tcp": list(self.tcp) if self.tcp else None, "token": self.token.hex()}

    def _accept(self, lst: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = lst.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._read, args=(conn,), name="moeray-channel-read", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        """One connection: check the token, then queue its calls for the worker until it closes."""
        try:
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10.0)
            if not hmac.compare_digest(bytes(recv_exact(conn, TOKEN_BYTES)), self.token):
                conn.close()
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            while not self._closed.is_set():
                rid, layer, meta_n, rows_n = CALL.unpack(recv_exact(conn, CALL.size))
                meta = recv_exact(conn, meta_n)
                rows = recv_exact(conn, rows_n)
                self._work.put((conn, rid, layer, meta, rows))
        except (OSError, ChannelClosed, struct.error):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _worker(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, rid, layer, meta, rows = item
            try:
                status, payload = OK, self.handler(layer, meta, rows)
            except Exception as e:  # noqa: BLE001 - the caller gets the actor's own error, the server goes on
                status, payload = ERROR, f"{type(e).__name__}: {e}".encode()
            self.calls += 1
            try:
                send_parts(conn, [ANSWER.pack(rid, status, len(payload)), payload])
            except OSError:
                pass  # the caller went away: its reader closes the connection

    def close(self) -> None:
        self._closed.set()
        for s in self._listeners:
            s.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._work.put(None)
        shutil.rmtree(self._dir, ignore_errors=True)


class ChannelClient:
    """One connection to a ChannelServer. `call` sends and returns a Future completed by `read_ready` (called by
    whoever waits: the gating actor's step thread), so no thread hand-off per call. After any connection error
    every pending call fails with ChannelClosed and the client stays closed (the transport reconnects).
    `timeout_s` bounds each blocking send and the read of a frame that has begun to arrive."""

    def __init__(self, address: dict[str, Any], local: bool, timeout_s: float = 30.0) -> None:
        token = bytes.fromhex(address["token"])
        if local and address.get("uds") and os.path.exists(address["uds"]):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: Any = address["uds"]
        elif address.get("tcp"):
            host, port = address["tcp"]
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            where = (host, int(port))
        else:
            raise ChannelClosed(f"no reachable channel address in {sorted(address)} (another node without TCP)")
        sock.settimeout(timeout_s)
        try:
            sock.connect(where)
            sock.sendall(token)
        except OSError as e:
            sock.close()
            raise ChannelClosed(f"cannot connect to {where}: {e}") from e
        self.sock = sock
        self.closed = False
        self._next = 0
        self.pending: dict[int, Future] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def call(self, layer: int, meta: Any, rows: Any) -> Future:
        f: Future = Future()
        if self.closed:
            f.set_exception(ChannelClosed("channel closed"))
            return f
        rid = self._next
        self._next += 1
        meta_n, rows_n = memoryview(meta).nbytes, memoryview(rows).nbytes
        self.pending[rid] = f
        try:
            send_parts(self.sock, [CALL.pack(rid, layer, meta_n, rows_n), meta, rows])
        except OSError as e:
            self.fail(ChannelClosed(f"send failed: {e}"))
        return f

    def read_ready(self) -> int:
        """Read every answer that has arrived (at least one frame if the socket is readable); returns how many."""
        n = 0
        try:
            while not self.closed:
                r, _, _ = select.select([self.sock], [], [], 0)
                if not r:
                    return n
                rid, status, size = ANSWER.unpack(recv_exact(self.sock, ANSWER.size))
                payload = recv_exact(self.sock, size)
                f = self.pending.pop(rid, None)
                n += 1
                if f is None or f.done():
                    continue  # abandoned (a hedge won elsewhere) or cancelled
                if status == OK:
                    f.set_result(payload)
                else:
                    f.set_exception(RemoteCallError(payload.decode(errors="replace")))
        except (OSError, ChannelClosed, struct.error) as e:
            self.fail(e if isinstance(e, ChannelClosed) else ChannelClosed(f"read failed: {e}"))
        return n

    def fail(self, error: BaseException) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        pending, self.pending = self.pending, {}
        for f in pending.values():
            if not f.done():
                f.set_exception(error)

    def close(self) -> None:
        self.fail(ChannelClosed("channel closed by the caller"))


def wait_readable(clients: list[ChannelClient], timeout_s: float) -> None:
    """Block until one of `clients` has an answer (or timeout_s), then read every ready answer of every client."""
    live = [c for c in clients if not c.closed]
    if not live:
        return
    try:
        r, _, _ = select.select(live, [], [], max(0.0, timeout_s))
    except (OSError, ValueError):  # a socket closed under us: read_ready of each finds out which
        r = live
    for c in r:
        c.read_ready()
