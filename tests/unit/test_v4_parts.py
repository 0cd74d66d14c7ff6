"""V4 building blocks: config validation, compressor pooling, hyper-connection Sinkhorn, cache layout."""

import pytest
import torch

from moeray.common.errors import ConfigError
from moeray.models.config import ModelConfig
from moeray.models.v4.cache import held_bytes
from moeray.models.v4.compressor import pool_windows
from moeray.models.v4.config import CSA, HCA, SLIDING, v4_extra
from moeray.models.v4.hyper import sinkhorn
from moeray.models.v4.model import V4DenseModel, v4_checkpoint_name

HF = dict(model_type="deepseek_v4", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
          head_dim=16, q_lora_rank=8, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
          sliding_window=4, o_groups=2, o_lora_rank=4, index_n_heads=2, index_head_dim=8, index_topk=2,
          partial_rotary_factor=0.5, layer_types=[SLIDING, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"],
          compress_rates={CSA: 4, HCA: 8})


def test_config_reads_v4_fields():
    cfg = ModelConfig.from_hf_dict(HF)
    x = v4_extra(cfg)
    assert cfg.attention_kind == "v4" and cfg.scoring_func == "sqrtsoftplus" and cfg.num_key_value_heads == 1
    assert cfg.moe_layers == (0, 1, 2) and cfg.shared_intermediate_size == 8
    assert (x.csa_rate, x.hca_rate, x.main_rope_dim, x.compress_rope_dim) == (4, 8, 8, 8)
    assert x.swiglu_limit == 10.0 and x.hc_mult == 4  # transformers' defaults


def test_config_folds_legacy_keys():
    legacy = {k: v for k, v in HF.items() if k not in ("layer_types", "mlp_layer_types", "compress_rates",
                                                        "partial_rotary_factor")}
    legacy.update(compress_ratios=[0, 4, 128], num_hash_layers=1, qk_rope_head_dim=8, compress_rate_hca=8)
    x = v4_extra(ModelConfig.from_hf_dict(legacy))
    assert x.layer_types == (SLIDING, CSA, HCA) and x.mlp_layer_types == ("hash_moe", "moe", "moe")
    assert x.hca_rate == 8 and x.main_rope_dim == 8


@pytest.mark.parametrize("change,field", [
    (dict(o_groups=3), "o_groups"),
    (dict(layer_types=[SLIDING, "full_attention", HCA]), "layer_types"),
    (dict(mlp_layer_types=["moe"]), "mlp_layer_types"),
    (dict(swiglu_limit=0.0), "swiglu_limit"),
    (dict(n_shared_experts=2), "n_shared_experts"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(partial_rotary_factor=0.2), "partial_rotary_factor"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(compress_rates={CSA: 0, HCA: 8}), "compress_rates"),
])
def test_config_rejects_bad_fields_naming_them(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict({**HF, **change})


def test_pooling_matches_naive_overlapping_windows():
    g = torch.Generator().manual_seed(0)
    m, d, n_win = 3, 2, 4
    kv, gate = torch.randn(n_win * m, 2 * d, generator=g), torch.randn(n_win * m, 2 * d, generator=g)
    bias = torch.randn(m, 2 * d, generator=g)
    got = pool_windows(kv, gate, bias, m, overlap=True, has_prev=False)
    for w in range(n_win):
        slots = [(kv[w * m + j, d:], gate[w * m + j, d:] + bias[j, d:]) for j in range(m)]
        if w > 0:
            slots += [(kv[(w - 1) * m + j, :d], gate[(w - 1) * m + j, :d] + bias[j, :d]) for j in range(m)]
        k, z = torch.stack([s[0] for s in slots]), torch.stack([s[1] for s in slots])
        assert torch.allclose(got[w], (k * z.softmax(0)).sum(0), atol=1e-6)
    # pooling windows 2..3 with window 1 as the predecessor gives the same rows
    tail = pool_windows(kv[m:], gate[m:], bias, m, overlap=True, has_prev=True)
    assert torch.allclose(tail, got[2:], atol=1e-6)


def test_sinkhorn_is_near_doubly_stochastic():
    comb = sinkhorn(torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(1)), iters=20, eps=1e-6)
    assert torch.allclose(comb.sum(-1), torch.ones(5, 4), atol=1e-2)  # rows converge; columns are exact
    assert torch.allclose(comb.sum(-2), torch.ones(5, 4), atol=1e-5)


def test_cache_layout_and_held_bytes():
    cfg = ModelConfig.from_hf_dict(HF)
    spec = V4DenseModel(cfg).cache_spec()
    assert [s.kind for s in spec.layers] == ["v4_window", "v4_csa", "v4_hca"]
    csa = {t.name: (t.row_shape, t.tokens_per_row, t.window) for t in spec.layers[1].tensors}
    assert csa == {"kv": ((16,), 1, 4), "comp": ((16,), 4, 0), "comp_raw": ((2, 32), 1, 8),
                   "index": ((8,), 4, 0), "index_raw": ((2, 16), 1, 8)}
    assert spec.block_multiple() == 8
    # growth per token once every window is full: CSA comp + index rows, HCA comp rows (fp32)
    per_token = (held_bytes(spec, 8000) - held_bytes(spec, 4000)) / 4000
    assert per_token == pytest.approx(4 * ((16 + 8) / 4 + 16 / 8))


def test_checkpoint_names_are_deepseeks():
    name = v4_checkpoint_name
    assert name("layers.1.self_attn.indexer.position_bias") == "model.layers.1.attn.indexer.compressor.ape"
    assert name("layers.1.self_attn.indexer.q_b_proj.weight") == "model.layers.1.attn.indexer.wq_b.weight"
    assert name("layers.0.mlp.shared_experts.gate_proj.weight") == "model.layers.0.ffn.shared_experts.w1.weight"
    assert v4_checkpoint_name("layers.2.attn_hc.fn") == "model.layers.2.hc_attn_fn"
    assert v4_checkpoint_name("lm_head.weight") == "head.weight"
    assert v4_checkpoint_name("lm_head.weight", tie_word_embeddings=True) == "model.embed_tokens.weight"
