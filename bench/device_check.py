"""Device check (issue 13): the expert actors on an accelerator (CUDA, or an Ascend NPU through torch_npu).

    python -m moeray.bench.device_check [--out bench/results/device_check.json] [--output-len 32]

Without an accelerator it says so and exits 0. With one, on bench/engine.py's checkpoint:
1. logits: ReferenceModel with its routed experts on the device in the serving dtype (bf16) against the fp32 CPU
   ReferenceModel on 4 prompts: max |logit diff| and greedy (argmax) agreement per position;
2. a deployment with `device: gpu|npu` (4 expert actors on the device; the gating actor stays on the CPU:
   gating_device other than cpu is not supported yet): greedy outputs checked position by position against the fp32
   reference (fraction within 5e-2 of the max logit);
3. throughput at B = 1, 16, 64 (64-token prompts, `--output-len` tokens) next to the same deployment on the CPU,
   in the same run.
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
    from moeray.bench.common import host_info
    from moeray.bench.engine import build_checkpoint
    from moeray.common.config import ServeConfig

    path = build_checkpoint(Path("bench/results/ckpt"))
    res: dict[str, Any] = {"bench": "device_check", "device": device, "host": host_info(),
                           "torch": torch.__version__}
    if device == "gpu":
        res["device_name"] = torch.cuda.get_device_name(0)
    print(f"[1/3] logits: experts on {device} in bfloat16 vs the fp32 CPU reference ...", flush=True)
    res["logits"] = logits_check(path, device, torch.bfloat16)
    print(json.dumps(res["logits"]), flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    base = dict(model=str(path), num_expert_groups=4, controller=False, namespace="moeray-device-check")
    batches = (1, 16, 64)
    dep = deploy(ServeConfig(**base, device=device, dtype="bfloat16", expert_num_cpus=0.5))
    try:
        res["experts"] = [{k: e[k] for k in ("device", "dtype", "weight_bytes")} for e in dep.status()["experts"]]
        print("[2/3] greedy outputs of the device deployment vs the fp32 reference ...", flush=True)
        res["greedy"] = greedy_check(dep, path, args.output_len)
        print(json.dumps(res["greedy"]), flush=True)
        print("[3/3] throughput ...", flush=True)
        res["tok_s_device"] = throughput(dep, batches, args.output_len, dep.model_cfg.vocab_size)
    finally:
        dep.shutdown()
    dep = deploy(ServeConfig(**base, device="cpu", dtype="auto"))
    try:
        res["tok_s_cpu"] = throughput(dep, batches, args.output_len, dep.model_cfg.vocab_size)
    finally:
        dep.shutdown()
    for b in batches:
        print(f"B={b:3d} {device} {res['tok_s_device'][b]:8.1f} tok/s  cpu {res['tok_s_cpu'][b]:8.1f} tok/s")
    return finish(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
