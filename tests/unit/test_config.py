"""Config parsing: both HF formats, and validation messages that name the field."""

import pytest

from moeray.common.errors import ConfigError
from moeray.models.config import ModelConfig

BASE_QWEN3 = dict(model_type="qwen3_moe", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  some_unused_key=123)
BASE_DSV3 = dict(model_type="deepseek_v3", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                 q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def test_unused_keys_ignored_and_moe_layers_derived():
    cfg = ModelConfig.from_hf_dict(BASE_QWEN3)
    assert cfg.moe_layers == (0, 1)
    assert cfg.rope.theta == 1e6
    cfg2 = ModelConfig.from_hf_dict(dict(BASE_QWEN3, mlp_only_layers=[0]))
    assert cfg2.moe_layers == (1,)


def test_legacy_hub_format_rope_scaling_and_deepseek_keys():
    legacy = dict(BASE_DSV3, rope_theta=10000, topk_method="noaux_tc", scoring_func="sigmoid",
                  rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    cfg = ModelConfig.from_hf_dict(legacy)
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 40 and cfg.rope.theta == 10000
    assert cfg.moe_layers == (1, 2) and cfg.attention_kind == "mla" and cfg.gate_bias


@pytest.mark.parametrize("change,field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=66, num_attention_heads=4), "num_attention_heads"),
    (dict(model_type="llama"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1.0}), "rope_type"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
])
def test_bad_qwen_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(dict(BASE_QWEN3, **change))


@pytest.mark.parametrize("change,field", [
    (dict(n_group=3), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
])
def test_bad_deepseek_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(dict(BASE_DSV3, **change))


def test_missing_key_is_named():
    d = dict(BASE_QWEN3)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(d)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
