"""Overload at 2x capacity: `moeray serve` with a small admission limit (--max-in-flight), offered twice what it
can take, over gRPC and HTTP.

    python -m moeray.bench.overload [--limit 4] [--max-tokens 32] [--overload-s 20] [--json out.json]

1. Capacity: a closed loop of exactly `limit` concurrent clients (the most the server admits) for
   `--capacity-requests` requests; capacity = completed requests per second, tokens per second beside it (and the
   same at concurrency 1, to show where it saturates).
2. Burst: 2 x limit requests at once, half gRPC, half HTTP, released together.
3. Sustained: an open loop at 2 x capacity (requests per second) for `--overload-s` seconds, alternating gRPC and
   HTTP; nobody retries.
Every answer is classified: completed (must carry exactly max_tokens tokens, finish_reason "length"), refused
(gRPC RESOURCE_EXHAUSTED / HTTP 429; the 429's OpenAI error body and any Retry-After header are recorded) or
anything else (lost: a failure). The RSS of the server process and of its whole process tree (Ray's head and
actors are its descendants: `moeray serve` starts a private local Ray) is sampled before, during and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from moeray.bench.common import host_info, write_json
from moeray.bench.serving_systems import free_port, resolve_model

PROMPT = "w5 w9 w17 w33 w65 w129 w257 w513"  # words of the fallback model's vocabulary; any tokenizer takes them
READY_TIMEOUT_S = 300.0


def cpu_flags() -> list[str]:
    """The CPU flags the figures depend on (fp32 / bf16 matmul paths)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(set(flags) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class RSSSampler:
    """Samples the server process's RSS and its process tree's every `period_s` into phases."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: dict[str, list[tuple[int, int]]] = {}
        self.phase = "before"
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        self.samples.setdefault(self.phase, []).append(
            (rss_bytes(self.pid), sum(rss_bytes(p) for p in tree_pids(self.pid))))

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, dict[str, float]]:
        mib = 1 << 20
        return {phase: {"server_rss_mib_max": round(max(s for s, _ in v) / mib, 1),
                        "server_rss_mib_last": round(v[-1][0] / mib, 1),
                        "tree_rss_mib_max": round(max(t for _, t in v) / mib, 1),
                        "tree_rss_mib_last": round(v[-1][1] / mib, 1), "samples": len(v)}
                for phase, v in self.samples.items()}


class Server:
    """`moeray serve` in a child process (its own session, so stopping it stops its Ray too)."""

    def __init__(self, model: Path, limit: int, num_expert_groups: int) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.config = Path(tempfile.mkdtemp(prefix="moeray-overload-")) / "serve.yaml"
        self.config.write_text(json.dumps({"model": str(model), "model_name": "bench", "dtype": "float32",
                                           "num_expert_groups": num_expert_groups}))
        self.cmd = [sys.executable, "-m", "moeray.clients.cli", "serve", "--config", str(self.config),
                    "--port", str(self.grpc_port), "--http-port", str(self.http_port),
                    "--max-in-flight", str(limit)]
        self.log = self.config.with_name("serve.log")
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        env = {**os.environ, "RAY_ADDRESS": ""}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moeray serve exited with {self.proc.returncode}; log: {self.log}")
                try:
                    if (await c.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"moeray serve not ready after {READY_TIMEOUT_S:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Driver:
    """One request on either protocol -> an outcome row."""

    def __init__(self, grpc_address: str, http_url: str, max_tokens: int) -> None:
        from moeray.clients.client import AsyncMoerayClient

        self.max_tokens = max_tokens
        self.grpc = AsyncMoerayClient(grpc_address, token="")
        self.http = httpx.AsyncClient(base_url=http_url, timeout=300,
                                      limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))

    async def close(self) -> None:
        await self.grpc.close()
        await self.http.aclose()

    async def one(self, protocol: str) -> dict[str, Any]:
        from moeray.clients.client import ServerBusyError

        t0 = time.perf_counter()
        row: dict[str, Any] = {"protocol": protocol}
        try:
            if protocol == "grpc":
                c = await self.grpc.complete(PROMPT, max_tokens=self.max_tokens, ignore_eos=True, temperature=0.0)
                row.update(outcome="completed", tokens=len(c.token_ids), finish_reason=c.finish_reason)
            else:
                r = await self.http.post("/v1/completions", json={
                    "model": "bench", "prompt": PROMPT, "max_tokens": self.max_tokens, "ignore_eos": True,
                    "temperature": 0.0})
                if r.status_code == 200:
                    body = r.json()
                    row.update(outcome="completed", tokens=body["usage"]["completion_tokens"],
                               finish_reason=body["choices"][0]["finish_reason"])
                elif r.status_code == 429:
                    row.update(outcome="refused", status=429, error=r.json().get("error"),
                               retry_after=r.headers.get("retry-after"))
                else:
                    row.update(outcome="error", status=r.status_code, body=r.text[:300])
        except ServerBusyError as e:
            row.update(outcome="refused", status="RESOURCE_EXHAUSTED", error=str(e)[:200])
        except Exception as e:  # noqa: BLE001 - anything else is a lost request, reported
            row.update(outcome="error", error=f"{type(e).__name__}: {e}"[:300])
        row["latency_s"] = time.perf_counter() - t0
        if row["outcome"] == "completed" and (row["tokens"] != self.max_tokens or row["finish_reason"] != "length"):
            row["outcome"] = "short"  # admitted but cut: a lost request too
        return row


def tally(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"offered": len(rows)}
    for protocol in ("grpc", "http"):
        mine = [r for r in rows if r["protocol"] == protocol]
        out[protocol] = dict(Counter(r["outcome"] for r in mine))
    out["completed"] = sum(r["outcome"] == "completed" for r in rows)
    out["refused"] = sum(r["outcome"] == "refused" for r in rows)
    out["lost"] = sum(r["outcome"] in ("error", "short") for r in rows)
    out["refused_fraction"] = round(out["refused"] / len(rows), 3) if rows else None
    done = [r["latency_s"] for r in rows if r["outcome"] == "completed"]
    refused = [r["latency_s"] for r in rows if r["outcome"] == "refused"]
    out["completed_latency_s_median"] = round(statistics.median(done), 3) if done else None
    out["refusal_latency_ms_median"] = round(1000 * statistics.median(refused), 1) if refused else None
    http_refusal = next((r for r in rows if r.get("status") == 429), None)
    if http_refusal:
        out["http_429_example"] = {"error": http_refusal["error"], "retry_after": http_refusal["retry_after"]}
    grpc_refusal = next((r for r in rows if r.get("status") == "RESOURCE_EXHAUSTED"), None)
    if grpc_refusal:
        out["grpc_refusal_example"] = grpc_refusal["error"]
    errors = [r for r in rows if r["outcome"] in ("error", "short")]
    if errors:
        out["lost_examples"] = errors[:3]
    return out


async def closed_loop(driver: Driver, concurrency: int, total: int) -> dict[str, Any]:
    remaining = total
    rows: list[dict[str, Any]] = []

    async def worker(i: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            rows.append(await driver.one("grpc" if i % 2 == 0 else "http"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    done = sum(r["outcome"] == "completed" for r in rows)
    return {"concurrency": concurrency, "requests": total, "wall_s": round(wall, 2),
            "requests_per_s": round(done / wall, 3), "tokens_per_s": round(done * driver.max_tokens / wall, 1),
            **tally(rows)}


async def burst(driver: Driver, n: int) -> dict[str, Any]:
    rows = await asyncio.gather(*(driver.one("grpc" if i % 2 == 0 else "http") for i in range(n)))
    return tally(rows)


async def open_loop(driver: Driver, rate: float, duration_s: float) -> dict[str, Any]:
    tasks, t0, i = [], time.perf_counter(), 0
    while (now := time.perf_counter() - t0) < duration_s:
        due = i / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(driver.one("grpc" if i % 2 == 0 else "http")))
        i += 1
    rows = await asyncio.gather(*tasks)
    return {"rate_per_s": round(rate, 3), "duration_s": duration_s,
            "achieved_rate_per_s": round(len(rows) / duration_s, 3), **tally(rows)}


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model, model_note = resolve_model(args.model)
    server = Server(model, args.limit, args.num_expert_groups)
    result: dict[str, Any] = {"machine": {**host_info(), "cpu_flags": cpu_flags()}, "model": str(model),
                              "model_note": model_note, "limit": args.limit, "max_tokens": args.max_tokens,
                              "command": " ".join(server.cmd)}
    await server.start()
    sampler = RSSSampler(server.proc.pid)
    driver = Driver(f"127.0.0.1:{server.grpc_port}", f"http://127.0.0.1:{server.http_port}", args.max_tokens)
    try:
        sampler.start()
        await closed_loop(driver, args.limit, args.limit)  # warm-up
        await asyncio.sleep(1.0)
        sampler.phase = "capacity"
        result["capacity_c1"] = await closed_loop(driver, 1, max(2, args.capacity_requests // 4))
        result["capacity"] = cap = await closed_loop(driver, args.limit, args.capacity_requests)
        sampler.phase = "overload"
        result["burst_2x"] = await burst(driver, 2 * args.limit)
        result["sustained_2x"] = await open_loop(driver, 2 * cap["requests_per_s"], args.overload_s)
        sampler.phase = "after"
        await asyncio.sleep(2.0)
        result["after"] = await closed_loop(driver, args.limit, args.limit)  # still serving
        await asyncio.sleep(1.0)
    finally:
        await sampler.stop()
        await driver.close()
        server.stop()
    result["rss"] = sampler.summary()
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (default: the bundled demo model, else a tiny random one)")
    p.add_argument("--limit", type=int, default=4, help="--max-in-flight of the server (default 4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-expert-groups", type=int, default=2)
    p.add_argument("--capacity-requests", type=int, default=24, help="requests of the capacity loop (default 24)")
    p.add_argument("--overload-s", type=float, default=20.0, help="seconds of the 2x open loop (default 20)")
    p.add_argument("--json", type=Path, help="write the result here")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.overload", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = asyncio.run(run_benchmark(args))
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    lost = sum(result[k]["lost"] for k in ("capacity", "burst_2x", "sustained_2x", "after"))
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
