"""Tiny random Hugging Face checkpoints built by transformers (fixed seeds), saved as safetensors.

Tests never download anything: each family's checkpoint is built here, once per process and cached in a
temp folder. `build(family)` returns the folder.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_config(family: str):
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_COMMON, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                                 mlp_only_layers=[1])
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1)
    if family == "qwen3_moe_hd64":  # head_dim 64: the shapes models/paged_decode's bf16 kernel takes
        return tf.Qwen3MoeConfig(**_COMMON, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**_COMMON, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                                   qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 128, "mscale": 1.0,
                                                    "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    raise ValueError(family)


def build_hf_model(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "qwen3_moe_hd64": tf.Qwen3MoeForCausalLM,
           "deepseek_v3": tf.DeepseekV3ForCausalLM}[family]
    model = cls(cfg).eval()
    _perturb_router_state(model)
    return model


def _perturb_router_state(model) -> None:
    """Random init leaves DeepSeek's correction bias at zero and norms at one; give them values so the tests
    exercise them (biased choice, scaled norms)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@functools.cache
def build(family: str, seed: int = 0) -> Path:
    """Save the tiny model of `family` to a temp folder (once per process) and return the folder."""
    model = build_hf_model(family, seed)
    out = Path(tempfile.mkdtemp(prefix=f"moeray-{family}-"))
    model.save_pretrained(out)
    return out


@functools.cache
def load_hf(family: str, seed: int = 0):
    """The transformers model reloaded from the saved folder (the reference)."""
    import transformers as tf

    path = build(family, seed)
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
         "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
         "To be, or not to be, that is the question. All the world's a stage. ") * 20


@functools.cache
def build_with_tokenizer(family: str = "qwen3_moe", seed: int = 0) -> Path:
    """A tiny model of `family` with vocab 512 and a byte-level BPE tokenizer.json (for text end to end)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg.vocab_size = 512
    cfg.eos_token_id = tok.token_to_id("<|eos|>")
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "qwen3_moe_hd64": tf.Qwen3MoeForCausalLM,
           "deepseek_v3": tf.DeepseekV3ForCausalLM}[family]
    model = cls(cfg).eval()
    _perturb_router_state(model)
    out = Path(tempfile.mkdtemp(prefix=f"moeray-{family}-tok-"))
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    return out


@functools.cache
def build_skewed(seed: int = 0) -> Path:
    """Tiny DeepSeek-V3 whose correction bias sends every token to experts 0 and 1 (a skewed, hot group)."""
    model = build_hf_model("deepseek_v3", seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
                buf[:2] = 5.0
    out = Path(tempfile.mkdtemp(prefix="moeray-skewed-"))
    model.save_pretrained(out)
    return out
