"""Serving benchmark in the manner of vLLM's benchmark_serving: one workload, several systems, same run.

    python -m moeray.bench.serving [--quick] [--model DIR] [--rates 1,4,inf] [--num-prompts 40] ...
    moeray bench [--quick] ...

Method
1. Workload (per offered rate, seeded): `num_prompts` requests with Poisson arrivals (exponential gaps of mean
   1/rate; rate inf sends all at once), prompt and output lengths drawn uniformly from
   [len * (1 - range_ratio), len * (1 + range_ratio)], prompts of random token ids, greedy, `ignore_eos` so every
   system generates exactly the drawn number of tokens.
2. Systems, one after the other, each warmed up first:
   - moeray: `deploy()` in this process (the expert-group and gating actors on a private local Ray, or on the
     cluster at $RAY_ADDRESS), its OpenAI HTTP API (`serve_http`) on this event loop, driven over HTTP by the
     streaming client below, as a user would.
   - transformers: `generate()` in this process, static batching: whenever the model is free, every request that
     has arrived (up to --hf-max-batch) is left-padded into one `generate` call; requests arriving meanwhile wait
     for the next call. Token times come from a per-step hook (a StoppingCriteria that only reads the clock),
     i.e. as if each request's tokens were streamed as they are made.
   - vllm: `vllm serve` from its own venv (--vllm-python) as a subprocess, the same streaming client. Skipped
     with a reason in the JSON when that venv is missing, and under --quick (its CPU start-up alone is minutes).
3. Per request: TTFT = first streamed token - arrival; ITL = gaps between streamed chunks (as in vLLM's script;
   a server that coalesces tokens under load sends several per chunk, and then ITL shows the bursts while TPOT
   does not; `tokens_per_chunk` in the JSON says how much); TPOT = (last - first) / (tokens - 1). Per rate:
   request and output-token throughput over the time from the first arrival to the last token; TTFT, ITL, TPOT
   and end-to-end latency (mean, median, p99); goodput = requests per second with both TTFT <= --slo-ttft-ms and
   TPOT <= --slo-itl-ms (vLLM's per-request definition).

Out: JSON (--out, default bench/results/serving.json) and beside it, named after it, `serving_latency_cdf.png`
(TTFT and ITL CDFs per system and rate), `serving_throughput.png` (throughput and goodput vs offered rate) and
`serving_vllm.log` (vLLM's server log); a table on stdout.
Heavy imports (torch, ray, transformers, httpx, matplotlib) happen inside functions: `moeray bench --help` is cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/results/serving.json")
DEFAULT_VLLM_PYTHON = Path("/work/vllm-venv/bin/python")
FALLBACK_CACHE = Path(os.environ.get("MOERAY_CACHE", Path.home() / ".cache" / "moeray")) / "bench-tiny-qwen3-moe-v1"
SERVED_NAME = "bench"


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
# Metrics (pure)


@dataclass(slots=True)
class RequestResult:
    """One request's timeline, in seconds from the start of the run."""

    arrival_s: float
    chunk_times_s: list[float] = field(default_factory=list)  # each streamed chunk that carried tokens
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.arrival_s

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; 0 for a single-token answer."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def e2el_s(self) -> float:
        return self.chunk_times_s[-1] - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    if not values_s:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms), "median": percentile(ms, 50), "p99": percentile(ms, 99)}


@dataclass(frozen=True, slots=True)
class SLO:
    """A request meets it when its TTFT and its mean inter-token latency (TPOT) are both within bounds."""

    ttft_ms: float
    itl_ms: float

    def met(self, r: RequestResult) -> bool:
        return r.ok and r.ttft_s * 1000.0 <= self.ttft_ms and r.tpot_s * 1000.0 <= self.itl_ms


def summarize(results: Sequence[RequestResult], slo: SLO) -> dict[str, Any]:
    """Throughput, latency statistics and goodput of one (system, rate) run."""
    done = [r for r in results if r.ok]
    if not done:
        return {"completed": 0, "failed": len(results), "errors": sorted({r.error or "no tokens" for r in results})}
    start = min(r.arrival_s for r in results)
    duration = max(r.chunk_times_s[-1] for r in done) - start
    num_out = sum(r.output_tokens for r in done)
    num_good = sum(slo.met(r) for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_throughput": num_out / duration if duration > 0 else math.nan,
        "total_output_tokens": num_out,
        "tokens_per_chunk": num_out / sum(len(r.chunk_times_s) for r in done),
        "ttft_ms": stats_ms([r.ttft_s for r in done]),
        "itl_ms": stats_ms([x for r in done for x in r.itls_s]),
        "tpot_ms": stats_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "e2el_ms": stats_ms([r.e2el_s for r in done]),
        "goodput": num_good / duration if duration > 0 else math.nan,
        "slo_attainment": num_good / len(results),
    }


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


# ---------------------------------------------------------------------------------------------------------
# Systems


class MoeraySystem:
    """deploy() in this process + the HTTP API on this loop."""

    name = "moeray"

    def __init__(self, model_dir: Path, num_expert_groups: int) -> None:
        self.model_dir, self.num_expert_groups = model_dir, num_expert_groups
        self.info: dict[str, Any] = {}

    async def start(self) -> None:
        import ray

        from moeray.actors.backend import backends_for
        from moeray.actors.deploy import deploy
        from moeray.actors.http import serve_http
        from moeray.common.config import ServeConfig

        config = ServeConfig(model=str(self.model_dir), model_name=SERVED_NAME,
                             num_expert_groups=self.num_expert_groups)
        self._own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
        if self._own_ray:  # a private local Ray: ray.init() alone would join any cluster already on this machine
            ray.init(address="local", include_dashboard=False, namespace=config.namespace, log_to_driver=False)
        self.dep = deploy(config)  # blocks the loop, which has nothing else to do yet; Ray wants the main thread
        self.server, port = await serve_http(backends_for(self.dep), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        self.info = {"transport": config.transport, "num_expert_groups": config.num_expert_groups,
                     "num_gating_actors": config.num_gating_actors, "torch_threads_per_actor": config.torch_threads,
                     "driven_through": "HTTP /v1/completions (serve_http over deploy())"}

    async def run(self, workload, on_done) -> list[RequestResult]:
        return await run_openai_workload(self.url, SERVED_NAME, workload, on_done)

    async def stop(self) -> None:
        import ray

        if getattr(self, "server", None) is not None:
            await self.server.stop(0)
        if getattr(self, "dep", None) is not None:
            await asyncio.to_thread(self.dep.shutdown)
        if getattr(self, "_own_ray", False):
            ray.shutdown()


class TransformersSystem:
    """transformers generate() with static batching of the requests that have arrived (see the module doc)."""

    name = "transformers"

    def __init__(self, model_dir: Path, max_batch: int, threads: int) -> None:
        self.model_dir, self.max_batch, self.threads = model_dir, max_batch, threads
        self.info = {"batching": "static: all arrived requests per generate() call, left-padded",
                     "max_batch": max_batch, "torch_threads": threads}

    async def start(self) -> None:
        import torch
        import transformers

        torch.set_num_threads(self.threads)
        self.model = await asyncio.to_thread(
            transformers.AutoModelForCausalLM.from_pretrained, self.model_dir, dtype=torch.float32)
        self.model.eval()
        self.info["transformers"] = transformers.__version__

    async def run(self, workload, on_done) -> list[RequestResult]:
        return await asyncio.to_thread(self._run, workload, on_done)

    def _run(self, workload: Sequence[BenchRequest], on_done) -> list[RequestResult]:
        order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
        waiting, results = deque(order), [RequestResult(r.arrival_s) for r in workload]
        start = time.perf_counter()
        while waiting:
            now = time.perf_counter() - start
            if workload[waiting[0]].arrival_s > now:
                time.sleep(workload[waiting[0]].arrival_s - now)
                continue
            batch = []
            while waiting and len(batch) < self.max_batch and workload[waiting[0]].arrival_s <= now:
                batch.append(waiting.popleft())
            step_times = self._generate([workload[i] for i in batch], start)
            for i in batch:
                n = workload[i].max_tokens
                results[i].chunk_times_s, results[i].output_tokens = step_times[:n], n
                on_done()
        return results

    def _generate(self, batch: Sequence[BenchRequest], start: float) -> list[float]:
        """One generate() over the batch; the time each step's tokens were ready, in run seconds."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        times: list[float] = []

        class StepClock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                times.append(time.perf_counter() - start)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # left padding
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in batch), do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                stopping_criteria=StoppingCriteriaList([StepClock()]))
        return times

    async def stop(self) -> None:
        self.model = None  # frees its memory before the next system starts


class VllmSystem:
    """`vllm serve` in its own venv, as a subprocess; its log goes beside the JSON."""

    name = "vllm"

    def __init__(self, python: Path, model_dir: Path, max_model_len: int, log_path: Path, start_timeout_s: float):
        self.python, self.model_dir, self.max_model_len = python, model_dir, max_model_len
        self.log_path, self.start_timeout_s = log_path, start_timeout_s
        self.info: dict[str, Any] = {"python": str(python), "log": str(log_path)}
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        import httpx

        port = _free_port()
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(self.max_model_len), "--dtype", "float32", "--disable-log-stats"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self.info.update(command=" ".join(cmd), version=_vllm_version(self.python))
        t0 = time.monotonic()
        async with httpx.AsyncClient() as client:
            while time.monotonic() - t0 < self.start_timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm exited with {self.proc.returncode} while starting; see {self.log_path}")
                try:
                    if (await client.get(f"{self.url}/health", timeout=2)).status_code == 200:
                        self.info["start_s"] = round(time.monotonic() - t0, 1)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(2)
        raise TimeoutError(f"vllm did not come up within {self.start_timeout_s:.0f} s; see {self.log_path}")

    async def run(self, workload, on_done) -> list[RequestResult]:
        return await run_openai_workload(self.url, SERVED_NAME, workload, on_done)

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's session: the API server and its engine
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_version(python: Path) -> str:
    try:
        code = ("import importlib.metadata as m; print(*{d.metadata['Name'] + ' ' + d.version "
                "for d in m.distributions() if d.metadata['Name'].lower().startswith('vllm')})")
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# Model


def default_model() -> Path:
    from moeray.common.config import default_model_path

    return Path(default_model_path())


def resolve_model(arg: str | None) -> tuple[Path, str]:
    """(model folder, a note saying where it came from): --model, else the demo model, else the fallback."""
    if arg:
        return Path(arg), "given with --model"
    demo = default_model()
    if (demo / "config.json").exists():
        return demo, "the bundled demo model"
    return build_fallback_model(FALLBACK_CACHE), (
        f"the bundled demo model is missing ({demo}); built a tiny random qwen3_moe with transformers into "
        f"{FALLBACK_CACHE}")


def build_fallback_model(out: Path) -> Path:
    """A small random Qwen3-MoE (4 layers, 16 experts, top-2, vocab 1024) with a word-level tokenizer whose
    vocabulary is exactly the model's, so every generated id decodes. Built once, then reused."""
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = 1024
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<|eos|>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "unk_token": "<unk>",
         "model_max_length": 2048}))
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=2048, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=False)
    transformers.Qwen3MoeForCausalLM(config).eval().save_pretrained(out)
    return out


def model_facts(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_local_experts",
            "n_routed_experts", "num_experts_per_tok", "max_position_embeddings")
    return {k: config[k] for k in keys if k in config}


# ---------------------------------------------------------------------------------------------------------
# Report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["system", "rate", "done", "req/s", "out tok/s", "TTFT med", "TTFT p99", "TPOT med", "ITL med",
               "ITL p99", "goodput"]
    lines = [headers]
    for row in rows:
        s = row["summary"]
        if not s.get("completed"):
            lines.append([row["system"], _rate(row["rate"]), f"0/{s.get('failed', 0)}", *["-"] * 8])
            continue
        lines.append([row["system"], _rate(row["rate"]), f"{s['completed']}/{s['completed'] + s['failed']}",
                      f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                      f"{s['ttft_ms']['median']:.0f}", f"{s['ttft_ms']['p99']:.0f}", f"{s['tpot_ms']['median']:.1f}",
                      f"{s['itl_ms']['median']:.1f}", f"{s['itl_ms']['p99']:.1f}", f"{s['goodput']:.2f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    out = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + ("\n(latencies in ms; rate and goodput in req/s; ITL is per streamed chunk, TPOT per "
                             "token: they differ when a server sends several tokens in one chunk)")


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


COLORS = {"moeray": "tab:blue", "transformers": "tab:orange", "vllm": "tab:green"}


def plot(runs: dict[str, dict[float, list[RequestResult]]], summaries: list[dict[str, Any]], slo: SLO,
         out: Path, title: str) -> list[Path]:
    """The latency CDFs and throughput-vs-rate PNGs, named after the JSON `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out.with_name(f"{out.stem}_latency_cdf.png"), out.with_name(f"{out.stem}_throughput.png")]
    _plot_cdfs(plt, runs, slo, title, paths[0])
    _plot_throughput(plt, runs, summaries, slo, title, paths[1])
    return paths


def _plot_cdfs(plt, runs, slo: SLO, title: str, path: Path) -> None:
    """Small multiples: a column per offered rate, TTFT on top and ITL below, a line per system."""
    rates = sorted({rate for by_rate in runs.values() for rate in by_rate})
    fig, axes = plt.subplots(2, len(rates), figsize=(3.4 * len(rates) + 1, 6.4), sharex="row", sharey=True,
                             squeeze=False)
    for col, rate in enumerate(rates):
        for system, by_rate in runs.items():
            done = [r for r in by_rate.get(rate, []) if r.ok]
            series = [[r.ttft_s * 1000 for r in done], [max(x * 1000, 1e-2) for r in done for x in r.itls_s]]
            for row, values in enumerate(series):
                if values:
                    xs = sorted(values)
                    axes[row][col].step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                                        color=COLORS.get(system), label=system)
        axes[0][col].set_title(f"offered {_rate(rate)} req/s")
        for row, (name, limit) in enumerate([("TTFT", slo.ttft_ms), ("inter-token latency", slo.itl_ms)]):
            ax = axes[row][col]
            ax.axvline(limit, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(f"{name} (ms)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[1][0].set_ylabel("fraction of token gaps")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Latency CDFs (further left = faster; dashed = SLO)\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(plt, runs, summaries, slo: SLO, title: str, path: Path) -> None:
    """Served requests/s and goodput (left) and output tokens/s (right) against the offered rate."""
    rates = sorted({s["rate"] for s in summaries})
    inf_x = max((r for r in rates if not math.isinf(r)), default=1.0) * 2  # where "inf" sits on the axis
    x_of = lambda rate: inf_x if math.isinf(rate) else rate  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in runs:
        points = sorted((x_of(s["rate"]), s["summary"]) for s in summaries
                        if s["system"] == system and s["summary"].get("completed"))
        xs, c = [x for x, _ in points], COLORS.get(system)
        axes[0].plot(xs, [s["request_throughput"] for _, s in points], marker="o", color=c, label=f"{system} served")
        axes[0].plot(xs, [s["goodput"] for _, s in points], marker="x", linestyle="--", color=c,
                     label=f"{system} goodput")
        axes[1].plot(xs, [s["output_throughput"] for _, s in points], marker="o", color=c, label=system)
    finite = [r for r in rates if not math.isinf(r)]
    axes[0].plot(finite, finite, color="grey", linewidth=0.8, linestyle=":", label="offered")
    for ax, ylabel in zip(axes, ["requests / s", "output tokens / s"]):
        ax.set_xscale("log")
        ax.set_xticks([x_of(r) for r in rates], [_rate(r) for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("offered request rate (req/s, Poisson; inf = all at once)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"served and goodput (TTFT <= {slo.ttft_ms:g} ms, mean ITL <= {slo.itl_ms:g} ms)")
    axes[1].set_title("output token throughput")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Plan:
    rates: list[float]
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float
    seed: int
    slo: SLO
    systems: list[str]


QUICK = {"rates": "2,8,inf", "num_prompts": 16, "input_len": 64, "output_len": 32}
FULL = {"rates": "1,2,4,8,inf", "num_prompts": 40, "input_len": 128, "output_len": 64}


def make_plan(args: argparse.Namespace) -> Plan:
    preset = QUICK if args.quick else FULL
    try:
        rates = [float(x) for x in (args.rates or preset["rates"]).split(",")]
    except ValueError:
        raise ValueError(f"--rates: expected numbers separated by commas (or inf), got {args.rates!r}") from None
    if any(not (r > 0) for r in rates):
        raise ValueError(f"--rates: every rate must be > 0 (or inf), got {rates}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"moeray", "transformers", "vllm"}
    if unknown:
        raise ValueError(f"--systems: unknown {sorted(unknown)}; choose from moeray, transformers, vllm")
    return Plan(rates=rates, num_prompts=args.num_prompts or preset["num_prompts"],
                input_len=args.input_len or preset["input_len"], output_len=args.output_len or preset["output_len"],
                range_ratio=args.range_ratio, seed=args.seed, slo=SLO(args.slo_ttft_ms, args.slo_itl_ms),
                systems=systems)


def build_systems(plan: Plan, args: argparse.Namespace, model_dir: Path, max_model_len: int):
    """(systems to run, {name: reason} of those skipped)."""
    systems, skipped = [], {}
    for name in plan.systems:
        if name == "moeray":
            systems.append(MoeraySystem(model_dir, args.num_expert_groups))
        elif name == "transformers":
            systems.append(TransformersSystem(model_dir, args.hf_max_batch, args.hf_threads or (os.cpu_count() or 1)))
        elif not args.vllm_python.exists():
            skipped[name] = f"skipped: no vLLM venv at {args.vllm_python} (pass --vllm-python)"
        elif args.quick and not args.with_vllm:
            skipped[name] = "skipped: --quick (vLLM's CPU start-up alone takes minutes; add --with-vllm to include it)"
        else:
            log = args.out.with_name(f"{args.out.stem}_vllm.log")
            systems.append(VllmSystem(args.vllm_python, model_dir, max_model_len, log, args.vllm_start_timeout))
    return systems, skipped


async def run_system(system, workloads: dict[float, list[BenchRequest]], warmup: list[BenchRequest]):
    """Start, warm up, run every rate, stop (also after a failure). Returns ({rate: results}, start seconds)."""
    by_rate = {}
    try:
        t0 = time.monotonic()
        await system.start()
        start_s = time.monotonic() - t0
        await system.run(warmup, lambda: None)
        for rate, workload in workloads.items():
            with progress(len(workload), f"{system.name} @ {_rate(rate)} req/s") as bar:
                by_rate[rate] = await system.run(workload, bar.update)
    finally:
        await system.stop()
    return by_rate, start_s


class _Counter:
    """A printed counter, for when tqdm is not installed."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc) -> None:
        print(file=sys.stderr)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t_begin = time.monotonic()
    plan = make_plan(args)
    model_dir, model_note = resolve_model(args.model)
    print(f"model: {model_dir} ({model_note})", flush=True)
    facts = model_facts(model_dir)
    vocab = _tokenizer_vocab(model_dir) or facts.get("vocab_size", 2)
    max_model_len = min(int(facts.get("max_position_embeddings", 2048)), 4096)
    token_range = (2, vocab)  # ids 0 and 1 are often pad / eos; any id decodes
    workloads = {rate: make_workload(plan.num_prompts, rate, plan.input_len, plan.output_len, plan.range_ratio,
                                     token_range, plan.seed) for rate in plan.rates}
    warmup = make_workload(2, math.inf, plan.input_len, 4, 0.0, token_range, plan.seed + 99)
    systems, skipped = build_systems(plan, args, model_dir, max_model_len)

    runs: dict[str, dict[float, list[RequestResult]]] = {}
    report: dict[str, Any] = {name: {"status": reason} for name, reason in skipped.items()}
    for system in systems:
        print(f"{system.name}: starting", flush=True)
        try:
            runs[system.name], start_s = await run_system(system, workloads, warmup)
            report[system.name] = {"status": "ok", "start_s": round(start_s, 1), **system.info}
        except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' numbers
            report[system.name] = {"status": f"failed: {type(e).__name__}: {e}", **system.info}
            print(f"{system.name}: failed: {e}", file=sys.stderr, flush=True)

    summaries = [{"system": name, "rate": rate, "summary": summarize(results, plan.slo),
                  "requests": [_request_row(r) for r in results]}
                 for name, by_rate in runs.items() for rate, results in by_rate.items()]
    return {"plan": plan, "model_dir": model_dir, "model_note": model_note, "facts": facts, "runs": runs,
            "systems": report, "summaries": summaries, "wall_s": time.monotonic() - t_begin}


def _request_row(r: RequestResult) -> dict[str, Any]:
    if not r.ok:
        return {"arrival_s": round(r.arrival_s, 4), "error": r.error}
    return {"arrival_s": round(r.arrival_s, 4), "ttft_ms": round(r.ttft_s * 1000, 2),
            "tpot_ms": round(r.tpot_s * 1000, 2), "e2el_ms": round(r.e2el_s * 1000, 2),
            "output_tokens": r.output_tokens, "num_chunks": len(r.chunk_times_s)}


def _tokenizer_vocab(model_dir: Path) -> int | None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size()


def ratios(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """moeray / peer at each rate, for output throughput and median TTFT / ITL (> 1: moeray larger)."""
    by = {(s["system"], s["rate"]): s["summary"] for s in summaries}
    out: dict[str, dict[str, float]] = {}
    for (system, rate), peer in by.items():
        mine = by.get(("moeray", rate))
        if system == "moeray" or not mine or not mine.get("completed") or not peer.get("completed"):
            continue
        out[f"moeray/{system}@{_rate(rate)}"] = {
            "output_throughput": mine["output_throughput"] / peer["output_throughput"],
            "ttft_median": mine["ttft_ms"]["median"] / peer["ttft_ms"]["median"],
            "itl_median": mine["itl_ms"]["median"] / peer["itl_ms"]["median"],
        }
    return out


def to_json(result: dict[str, Any], args: argparse.Namespace, pngs: list[Path]) -> dict[str, Any]:
    plan: Plan = result["plan"]
    rows = [{**s, "rate": _rate(s["rate"])} for s in result["summaries"]]
    return {
        "benchmark": "serving",
        "quick": bool(args.quick),
        "model": {"path": str(result["model_dir"]), "source": result["model_note"], **result["facts"]},
        "workload": {"rates_req_per_s": [_rate(r) for r in plan.rates], "num_prompts_per_rate": plan.num_prompts,
                     "input_len": plan.input_len, "output_len": plan.output_len, "range_ratio": plan.range_ratio,
                     "seed": plan.seed, "arrivals": "poisson", "prompts": "random token ids", "sampling": "greedy",
                     "ignore_eos": True},
        "slo": {"ttft_ms": plan.slo.ttft_ms, "itl_ms": plan.slo.itl_ms,
                "goodput": "requests/s with TTFT <= ttft_ms and mean inter-token latency (TPOT) <= itl_ms"},
        "systems": result["systems"],
        "results": rows,
        "ratios": ratios(result["summaries"]),
        "plots": [str(p) for p in pngs],
        "machine": _machine(),
        "wall_s": round(result["wall_s"], 1),
    }


def _machine() -> dict[str, Any]:
    from moeray.bench.common import host_info

    info = host_info()
    info["load_avg_1m_at_end"] = info.pop("load_avg_1m")
    return info


def _json_safe(obj):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by `moeray bench` and `python -m moeray.bench.serving`)."""
    p.add_argument("--quick", action="store_true",
                   help=f"small workload, under 3 minutes: {QUICK} (default {FULL}); skips vLLM")
    p.add_argument("--model", help="model folder (default: the bundled demo model, else a tiny built one)")
    p.add_argument("--rates", help="offered request rates, comma-separated req/s; inf = all at once")
    p.add_argument("--num-prompts", type=int, help="requests per rate")
    p.add_argument("--input-len", type=int, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO on time to first token")
    p.add_argument("--slo-itl-ms", type=float, default=100.0,
                   help="goodput SLO on a request's mean inter-token latency (TPOT)")
    p.add_argument("--systems", default="moeray,transformers,vllm", help="which systems to run")
    p.add_argument("--num-expert-groups", type=int, default=2, help="moeray's expert-group actors")
    p.add_argument("--hf-max-batch", type=int, default=64, help="transformers: requests per generate() at most")
    p.add_argument("--hf-threads", type=int, help="transformers: torch threads (default: all cores)")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="python of the vLLM venv")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0, help="seconds to wait for vLLM to start")
    p.add_argument("--with-vllm", action="store_true", help="include vLLM even under --quick")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNGs go beside it")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write JSON and PNGs, print the table. Returns the exit code."""
    result = asyncio.run(run_benchmark(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_name = result["model_dir"].name
    title = (f"{model_name} | {result['plan'].num_prompts} requests per rate, in ~{result['plan'].input_len} / "
             f"out ~{result['plan'].output_len} tokens | {os.cpu_count()} cores")
    pngs = []
    if result["runs"]:
        pngs = plot(result["runs"], result["summaries"], result["plan"].slo, args.out, title)
    data = to_json(result, args, pngs)
    args.out.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    print()
    print(format_table(result["summaries"]))
    for name, info in result["systems"].items():
        if info["status"] != "ok":
            print(f"{name}: {info['status']}")
    print(f"wrote {args.out}" + "".join(f", {p}" for p in pngs))
    print(f"wall time {result['wall_s']:.0f} s")
    ok = any(info["status"] == "ok" for info in result["systems"].values())
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeray.bench.serving", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

