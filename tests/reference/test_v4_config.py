"""moeray reads V4's legacy config keys the way transformers' DeepseekV4Config folds them in."""

import pytest
import torch

from moeray.models.config import ModelConfig, RopeConfig
from moeray.models.v4.rope import V4Rotary

LEGACY = dict(model_type="deepseek_v4", vocab_size=64, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
              head_dim=16, q_lora_rank=8, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
              sliding_window=4, o_groups=2, o_lora_rank=4, index_n_heads=2, index_head_dim=8, index_topk=2,
              compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2, qk_rope_head_dim=8, compress_rate_hca=16,
              bos_token_id=0, eos_token_id=1, rope_theta=5000.0, compress_rope_theta=80000.0,
              max_position_embeddings=4096,
              rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                               "beta_fast": 32, "beta_slow": 1})


@pytest.fixture(scope="module")
def hf_config():
    import transformers as tf

    kwargs = {k: v for k, v in LEGACY.items() if k != "model_type"}
    return tf.DeepseekV4Config(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()})


def test_legacy_keys_read_like_transformers(hf_config):
    ours = ModelConfig.from_hf_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in LEGACY.items()})
    saved = ModelConfig.from_hf_dict(hf_config.to_dict())  # what save_pretrained writes
    assert ours == saved
    assert list(ours.extra["layer_types"]) == hf_config.layer_types
    assert list(ours.extra["mlp_layer_types"]) == hf_config.mlp_layer_types


@pytest.mark.parametrize("label", ["main", "compress"])
def test_rope_tables_match_transformers(hf_config, label):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    x = ModelConfig.from_hf_dict(hf_config.to_dict()).extra
    ours = V4Rotary(RopeConfig(**x[f"{label}_rope"]), x[f"{label}_rope_dim"], 4096)
    ref = DeepseekV4RotaryEmbedding(hf_config)
    pos = torch.arange(0, 3000, 7)
    cos, sin = ref(torch.zeros(1), pos[None], layer_type=label)
    c, s = ours.cos_sin(pos)
    assert torch.allclose(c, cos[0], atol=1e-6) and torch.allclose(s, sin[0], atol=1e-6)
