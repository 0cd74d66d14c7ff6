"""Tiny random DeepSeek-V4 checkpoints built by transformers (fixed seeds), saved as safetensors.

Two configs cover every V4 layer kind (sliding window, CSA, HCA), hash and score-routed MoE layers, the
overlapping (CSA) and plain (HCA) compressors, a yarn-scaled compress rope (config "b"), more compressed rows
than `index_topk` and >= 8 indexer heads (so no indexer-score ties reach the top-k boundary).
Random init leaves sinks, position biases, hyper-connection bases and routing buffers at 0 / 1 and the
hash table all zeros; `_perturb` gives them values so the tests exercise them.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

CONFIGS = ("a", "b")

_SPECS = {
    # 4 layers: window 8, CSA m=4 (overlap), HCA m'=8; hash routing on layer 0.
    "a": dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
              partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
              moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
              routed_scaling_factor=1.5, swiglu_limit=1.0, sliding_window=8,
              layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                           "compressed_sparse_attention"],
              mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
              index_n_heads=8, index_head_dim=16, index_topk=3, hc_mult=4, hc_sinkhorn_iters=20,
              compress_rope_theta=160000.0, max_position_embeddings=512, initializer_range=0.1),
    # 5 layers: window 5, CSA m=2, HCA m'=6, two hash layers, hc_mult 2, yarn on the compress rope.
    "b": dict(vocab_size=128, hidden_size=48, num_hidden_layers=5, num_attention_heads=6, head_dim=16,
              partial_rotary_factor=0.5, q_lora_rank=24, o_groups=3, o_lora_rank=8,
              moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
              routed_scaling_factor=2.0, swiglu_limit=0.5, sliding_window=5,
              layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                           "heavily_compressed_attention", "compressed_sparse_attention"],
              mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
              compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 6},
              index_n_heads=8, index_head_dim=16, index_topk=4, hc_mult=2, hc_sinkhorn_iters=5,
              compress_rope_theta=40000.0, rope_theta=10000.0,
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                               "beta_fast": 32, "beta_slow": 1},
              max_position_embeddings=512, initializer_range=0.1),
}


def hf_config(name: str):
    import transformers as tf

    return tf.DeepseekV4Config(**_SPECS[name], eos_token_id=1, bos_token_id=0, tie_word_embeddings=False)


def build_hf_model(name: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.DeepseekV4ForCausalLM(hf_config(name)).eval()
    _perturb(model, seed)
    return model


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(1234 + seed)

    def rnd(shape, scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    cfg = model.config
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.1)
            elif name.endswith("tid2eid"):  # a distinct expert set per token
                perm = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)
                                    for _ in range(buf.shape[0])])
                buf.copy_(perm[:, :buf.shape[1]])
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and ("norm" in name or "layernorm" in name):
                p.copy_(1.0 + rnd(p.shape, 0.1))
            elif leaf in ("sinks", "position_bias"):
                p.copy_(rnd(p.shape, 0.5))
            elif leaf in ("base", "hc_base"):
                p.copy_(rnd(p.shape, 0.5))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1.0 + rnd(p.shape, 0.2))
            elif name.endswith("gate.weight"):
                p.copy_(rnd(p.shape, 0.5))


@functools.cache
def build(name: str, seed: int = 0) -> Path:
    """Save tiny V4 config `name` to a temp folder (once per process) and return the folder."""
    out = Path(tempfile.mkdtemp(prefix=f"moeray-v4{name}-"))
    build_hf_model(name, seed).save_pretrained(out)
    return out


@functools.cache
def load_hf(name: str, seed: int = 0):
    """The transformers model reloaded from the saved folder (the reference)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(build(name, seed), dtype=torch.float32).eval()
