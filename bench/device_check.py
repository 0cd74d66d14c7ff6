"""Device check (issue 13): experts and the gating engine on an accelerator (CUDA, or an Ascend NPU via torch_npu).

    python -m moeray.bench.device_check [--out bench/results/device_check.json] [--output-len 32]

Without an accelerator it says so and exits 0. With one, on bench/engine.py's checkpoint:
1. logits: ReferenceModel with its routed experts on the device in the serving dtype (bf16) against the fp32 CPU
   ReferenceModel on 4 prompts: max |logit diff| and greedy (argmax) agreement per position;
2. the engine in process on the device (Engine(device=...): dense weights, paged KV cache, attention, gate,
   sampling and the routed experts there, bf16): greedy outputs checked position by position against the fp32
   reference (fraction within 5e-2 of the max logit);
3. a deployment with `gating_device` on the accelerator, and `device` too when the machine has 5 of them (each
   actor asks for a whole one: 4 expert actors + the gating actor; with fewer the experts stay on the CPU and rows
   cross the object store from the device): status (devices, dtypes) and the greedy check;
4. throughput at B = 1, 16, 64 (64-token prompts, `--output-len` tokens) of the engine in process and of step 3's
   deployment, next to the same two on the CPU, in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import finish


def find_accelerator() -> str | None:
    """'gpu', 'npu' or None, without initialising anything that is not there."""
    if torch.cuda.is_available():
        return "gpu"
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return None
    return "npu" if torch.npu.is_available() else None


def logits_check(path: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from moeray.actors.devices import torch_device
    from moeray.models.checkpoint import Checkpoint, load_experts_into, new_expert_group
    from moeray.models.reference import ReferenceModel, split_slots

    ref = ReferenceModel.from_pretrained(path, num_expert_groups=4)
    ckpt = Checkpoint(str(path))
    groups = []
    for slots in split_slots(ref.cfg, 4, "round_robin"):
        g = new_expert_group(ref.cfg, ckpt, dtype=dtype, device=torch_device(device))
        load_experts_into(g, ref.cfg, ckpt, slots)
        groups.append(g)
    on_dev = ReferenceModel(ref.cfg, ref.dense, groups)
    ids = torch.randint(0, ref.cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref.forward(ids), on_dev.forward(ids)
    return {"max_abs_diff": float((a - b).abs().max()), "max_logit_abs": float(a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def engine_on(path: Path, device: str, dtype: torch.dtype):
    """The engine in process with everything on `device` (a placement: cpu, gpu, npu): dense part, paged cache,
    sampling, and one local expert group holding every expert."""
    from moeray.actors.devices import torch_device
    from moeray.engine.engine import Engine, EngineConfig
    from moeray.engine.transport import LocalTransport, local_expert_groups
    from moeray.models.checkpoint import Checkpoint, load_dense, load_experts_into, new_expert_group
    from moeray.models.config import ModelConfig
    from moeray.models.registry import build_dense_model
    from moeray.router.table import RoutingTable

    dev = torch_device(device)
    cfg = ModelConfig.from_pretrained(str(path))
    ckpt = Checkpoint(str(path))
    dense = build_dense_model(cfg)
    load_dense(dense, cfg, ckpt)
    table = RoutingTable.round_robin(list(cfg.moe_layers), cfg.num_experts, 1)
    groups = local_expert_groups(table, lambda: new_expert_group(cfg, ckpt, dtype=dtype, device=dev),
                                 lambda g, slots: load_experts_into(g, cfg, ckpt, slots))
    return Engine(dense.eval(), LocalTransport(groups, table), EngineConfig(num_blocks=2048, dtype=dtype), device=dev)


def throughput(dep, batches, output_len: int, vocab: int, rounds: int = 3) -> dict[int, float]:
    from moeray.bench.engine import make_prompts
    from moeray.common import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    out = {}
    for b in batches:
        prompts = make_prompts(b, 64, vocab, 0)
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            dep.generate(prompts, sp)
            rates.append(b * output_len / (time.perf_counter() - t0))
        out[b] = statistics.median(rates)
    return out


def greedy_check(dep, path: Path, output_len: int) -> dict[str, Any]:
    """`dep`: anything with generate(prompts, params) (a Deployment, an Engine)."""
    from moeray.common import SamplingParams
    from moeray.models.reference import ReferenceModel

    ref = ReferenceModel.from_pretrained(path)
    prompts = torch.randint(0, ref.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1)).tolist()
    outs = dep.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    gaps = []
    for p, o in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            logits = ref.forward(torch.tensor([p + o.token_ids]))[0]
        for i, t in enumerate(o.token_ids):
            row = logits[len(p) - 1 + i]
            gaps.append(float(row.max() - row[t]))
    return {"positions": len(gaps), "within_5e-2": sum(g <= 5e-2 for g in gaps) / len(gaps), "max_gap": max(gaps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.device_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/device_check.json"))
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args(argv)
    device = find_accelerator()
    if device is None:
        print("device check: no accelerator here (torch sees no CUDA device and torch_npu is not installed or sees "
              "no NPU); nothing to check. Run it on a CUDA or Ascend machine.")
        return 0
    import ray

    from moeray.actors.deploy import deploy
    from moeray.actors.resources import DEVICE_RESOURCE
    from moeray.bench.common import host_info
    from moeray.bench.engine import build_checkpoint
    from moeray.common.config import ServeConfig
    from moeray.models.dtypes import resolve_dtype

    path = build_checkpoint(Path("bench/results/ckpt"))
    res: dict[str, Any] = {"bench": "device_check", "device": device, "host": host_info(),
                           "torch": torch.__version__}
    if device == "gpu":
        res["device_name"] = torch.cuda.get_device_name(0)
    batches = (1, 16, 64)
    print(f"[1/4] logits: experts on {device} in bfloat16 vs the fp32 CPU reference ...", flush=True)
    res["logits"] = logits_check(path, device, torch.bfloat16)
    print(json.dumps(res["logits"]), flush=True)
    print(f"[2/4] the engine in process on {device} (bfloat16): greedy outputs vs the fp32 reference ...", flush=True)
    eng = engine_on(path, device, torch.bfloat16)
    res["engine_device"] = str(eng.device)
    res["engine_greedy"] = greedy_check(eng, path, args.output_len)
    print(json.dumps(res["engine_greedy"]), flush=True)
    print("[2/4] throughput of the engine in process, on the device and on the CPU ...", flush=True)
    vocab = eng.cfg.vocab_size
    res["engine_tok_s_device"] = throughput(eng, batches, args.output_len, vocab)
    del eng
    res["engine_tok_s_cpu"] = throughput(engine_on(path, "cpu", resolve_dtype("auto", "cpu")), batches,
                                         args.output_len, vocab)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    num = int(ray.cluster_resources().get(DEVICE_RESOURCE[device], 0))
    expert_device = device if num >= 5 else "cpu"
    base = dict(model=str(path), num_expert_groups=4, controller=False, namespace="moeray-device-check")
    # auto: bf16 on the accelerator; on CPU experts what that CPU computes fast (bf16 GEMMs crawl without AMX)
    dep = deploy(ServeConfig(**base, device=expert_device, gating_device=device, dtype="auto", expert_num_cpus=0.5))
    try:
        st = dep.status()
        res["experts"] = [{k: e[k] for k in ("device", "dtype", "weight_bytes")} for e in st["experts"]]
        res["gating"] = [{k: g[k] for k in ("placement", "device", "dtype")} for g in st["gating"]]
        print(f"[3/4] deployment: gating {json.dumps(res['gating'])}, experts on {expert_device} ({num} "
              f"{DEVICE_RESOURCE[device]}s here); greedy outputs vs the fp32 reference ...", flush=True)
        res["greedy"] = greedy_check(dep, path, args.output_len)
        print(json.dumps(res["greedy"]), flush=True)
        print("[4/4] throughput of the deployment ...", flush=True)
        res["tok_s_device"] = throughput(dep, batches, args.output_len, dep.model_cfg.vocab_size)
    finally:
        dep.shutdown()
    dep = deploy(ServeConfig(**base, device="cpu", dtype="auto"))
    try:
        res["tok_s_cpu"] = throughput(dep, batches, args.output_len, dep.model_cfg.vocab_size)
    finally:
        dep.shutdown()
    for b in batches:
        print(f"B={b:3d} engine {device} {res['engine_tok_s_device'][b]:8.1f} cpu {res['engine_tok_s_cpu'][b]:8.1f}"
              f" | deployment {device} {res['tok_s_device'][b]:8.1f} cpu {res['tok_s_cpu'][b]:8.1f} tok/s")
    return finish(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
