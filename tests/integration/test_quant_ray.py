"""A DeepSeek-V3 checkpoint in its published FP8 layout through Ray: 2 expert-group actors hold their experts
packed (weight_bytes <= 1.15x the checkpoint's packed bytes), greedy tokens pass teacher forcing against the
dequantized model in transformers, and a slot moved by unload/load stays packed; `expert_quant` on load through Ray."""

import ray
import torch
from support.quant_checkpoints import v3_pair
from support.teacher import hf_logits, teacher_forcing_failures

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.models.checkpoint import Checkpoint
from moeray.models.config import ModelConfig


def _packed_bytes(path, slots: dict[int, list[int]]) -> int:
    ckpt = Checkpoint(path)
    total = 0
    for layer, experts in slots.items():
        for e in experts:
            for p in ("gate_proj", "up_proj", "down_proj"):
                n = f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
                total += ckpt.raw(n).nbytes + ckpt.raw(n + "_scale_inv").nbytes
    return total


def test_fp8_checkpoint_on_two_expert_actors(ray_session):
    import transformers as tf

    q, oracle = v3_pair((32, 32))
    dep = deploy(ServeConfig(model=str(q), dtype="float32", num_expert_groups=2, kv_cache_blocks=64,
                             max_num_batched_tokens=32, controller=False))
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (20, 7)]
        outs = dep.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        hf = tf.AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32).eval()
        for p, o in zip(prompts, outs, strict=True):
            assert len(o.token_ids) == 16
            assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []
        actor = dep.expert_actors[0]
        held = ray.get(actor.loaded.remote())
        stats = ray.get(actor.stats.remote())
        packed = _packed_bytes(q, held)
        assert 0 < stats["weight_bytes"] <= 1.15 * packed, (stats["weight_bytes"], packed)
        # a move (EPLB / drain): unload a slot, load another; bytes follow the packed sizes
        layer = min(held)
        cfg = ModelConfig.from_pretrained(q)
        extra = next(e for e in range(cfg.num_experts) if e not in held[layer])
        ray.get(actor.unload_slots.remote({layer: [held[layer][0]]}))
        ray.get(actor.load_slots.remote({layer: [extra]}))
        now = ray.get(actor.loaded.remote())
        assert ray.get(actor.stats.remote())["weight_bytes"] <= 1.15 * _packed_bytes(q, now)
    finally:
        dep.shutdown()


def test_expert_quant_on_load_through_ray(ray_session):
    """`expert_quant: mxfp4` on a plain checkpoint: the actors hold MXFP4 bytes and generate what ReferenceModel
    with the same quantized experts generates (teacher-forced against its logits)."""
    from support.tiny_models import build

    from moeray.models.reference import ReferenceModel

    path = build("qwen3_moe")
    dep = deploy(ServeConfig(model=str(path), dtype="float32", num_expert_groups=2, kv_cache_blocks=64,
                             max_num_batched_tokens=32, controller=False, expert_quant="mxfp4"))
    try:
        prompt = torch.randint(2, 128, (12,), generator=torch.Generator().manual_seed(3)).tolist()
        out = dep.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        ref = ReferenceModel.from_pretrained(path, expert_quant="mxfp4")
        logits = ref.forward(torch.tensor([prompt + out.token_ids]))[0]
        assert teacher_forcing_failures(logits, len(prompt), out.token_ids) == []
        cfg = ModelConfig.from_pretrained(path)
        held = sum(ray.get(a.stats.remote())["weight_bytes"] for a in dep.expert_actors.values())
        fp32 = cfg.num_moe_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
        assert held == fp32 * 4.25 / 32  # every expert in MXFP4: a nibble + an e8m0 byte per 32 weights
    finally:
        dep.shutdown()
