"""The serving benchmark's workload (seeded Poisson arrivals, random token prompts) and the streaming OpenAI
client that sends it, the same for every system served over HTTP (moeray, `vllm serve`)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moeray.bench.serving_metrics import RequestResult

# ---------------------------------------------------------------------------------------------------------
# Workload (pure)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    arrival_s: float  # offset from the start of the run
    prompt_ids: list[int]
    max_tokens: int


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival offsets in seconds: the first at 0, then exponential gaps of mean 1/rate; rate inf -> all at 0."""
    if num_requests <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * num_requests
    assert rate > 0, rate
    times = [0.0]
    for _ in range(num_requests - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


def draw_length(mean: int, range_ratio: float, rng: random.Random) -> int:
    """Uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's random dataset)."""
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def make_workload(num_requests: int, rate: float, input_len: int, output_len: int, range_ratio: float,
                  token_id_range: tuple[int, int], seed: int) -> list[BenchRequest]:
    """The requests of one rate; the same seed gives the same prompts and lengths whatever the rate."""
    lengths_rng, arrivals_rng = random.Random(seed), random.Random(seed + 1)
    lo, hi = token_id_range
    requests = []
    for arrival in poisson_arrivals(num_requests, rate, arrivals_rng):
        n_in = draw_length(input_len, range_ratio, lengths_rng)
        n_out = draw_length(output_len, range_ratio, lengths_rng)
        prompt = [lengths_rng.randrange(lo, hi) for _ in range(n_in)]
        requests.append(BenchRequest(arrival, prompt, n_out))
    return requests


# ---------------------------------------------------------------------------------------------------------
# The streaming OpenAI client (moeray and vLLM)


async def run_openai_workload(base_url: str, model: str, workload: Sequence[BenchRequest],
                              on_done: Callable[[], None]) -> list[RequestResult]:
    """Send each request at its arrival time to /v1/completions (stream, token-id prompt, greedy, ignore_eos)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
            result = RequestResult(req.arrival_s)
            body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                await _stream_one(client, body, result, start)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                result.error = f"{type(e).__name__}: {e}"[:200]
            on_done()
            return result

        return list(await asyncio.gather(*(one(r) for r in workload)))


async def _stream_one(client, body: dict, result: RequestResult, start: float) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter() - start
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"].get("message"))[:200]
                return
            if chunk.get("choices"):
                result.chunk_times_s.append(now)
            if chunk.get("usage"):
                result.output_tokens = int(chunk["usage"]["completion_tokens"])


