"""The systems the serving benchmark drives: moeray and `vllm serve` over HTTP with the same client, and
transformers in process; the model they serve."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeray.bench.serving_metrics import RequestResult
from moeray.bench.serving_workload import BenchRequest, run_openai_workload

DEFAULT_VLLM_PYTHON = Path("/work/vllm-venv/bin/python")
FALLBACK_CACHE = Path(os.environ.get("MOERAY_CACHE", Path.home() / ".cache" / "moeray")) / "bench-tiny-qwen3-moe-v1"
SERVED_NAME = "bench"

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

    def __init__(self, python: Path, model_dir: Path, max_model_len: int, log_path: Path, start_timeout_s: float,
                 dtype: str = "auto"):
        self.python, self.model_dir, self.max_model_len = python, model_dir, max_model_len
        self.log_path, self.start_timeout_s = log_path, start_timeout_s
        self.dtype = vllm_dtype() if dtype == "auto" else dtype
        self.info: dict[str, Any] = {"python": str(python), "log": str(log_path), "dtype": self.dtype}
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        import httpx

        port = free_port()
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(self.max_model_len), "--dtype", self.dtype, "--disable-log-stats"]
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


def vllm_dtype() -> str:
    """vLLM-CPU at its best on this machine: bfloat16 where the CPU has AMX (2.4x its float32 speed), else float32
    (on AVX2-only CPUs bfloat16 is far slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "amx_bf16" in flags else "float32"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
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


