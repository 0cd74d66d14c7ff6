"""bench/hub_sizes.py: the published-format byte counts against hand-derived formulas for the hub configs."""

from moeray.bench import hub_sizes


def test_v3_routed_experts_are_fp8_with_fp32_block_scales():
    ex = hub_sizes.expert_bytes(hub_sizes.V3)
    # gate/up [2048, 7168] and down [7168, 2048]: one byte per weight + a float32 per 128x128 block
    assert ex["per_expert_bytes"] == 3 * 2048 * 7168 + 3 * 16 * 56 * 4
    assert ex["slots"] == (61 - 3) * 256


def test_v4_routed_experts_are_mxfp4():
    for hf in (hub_sizes.V4_FLASH, hub_sizes.V4_PRO):
        ex = hub_sizes.expert_bytes(hf)
        d, i = hf["hidden_size"], hf["moe_intermediate_size"]
        assert ex["per_expert_bytes"] * 8 == 3 * d * i * 4.25  # a nibble + 8 bits of scale per 32 weights
        assert ex["slots"] == hf["num_hidden_layers"] * hf["n_routed_experts"]


def test_v3_cache_is_the_mla_latent_and_rope_key():
    kv = hub_sizes.cache_bytes(hub_sizes.V3, context=4096)
    assert kv["spec_bytes_per_token"] == 61 * (512 + 64) * 2
    assert kv["bytes_per_token_at_4096"] == kv["spec_bytes_per_token"]  # no sliding window in V3


def test_v4_window_capping_only_lowers_the_cache():
    kv = hub_sizes.cache_bytes(hub_sizes.V4_FLASH, context=4096)
    assert 0 < kv["bytes_per_token_at_4096"] < kv["spec_bytes_per_token"]
