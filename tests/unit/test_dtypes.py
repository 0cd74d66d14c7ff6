"""The serving dtype: the run-time probe and ExpertGroup held in a dtype other than fp32."""

import pytest
import torch

from moeray.common.config import ServeConfig
from moeray.common.errors import ConfigError
from moeray.experts.group import ExpertGroup
from moeray.models.dtypes import cpu_bf16_is_fast, cpu_flags, resolve_dtype

D, I, E = 32, 48, 4


def test_explicit_names_resolve_without_probing():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")


def test_cpu_flags_decide_bf16():
    assert cpu_bf16_is_fast(frozenset({"avx2", "amx_bf16", "amx_tile"}))[0]
    assert cpu_bf16_is_fast(frozenset({"avx512f", "avx512_bf16"}))[0]
    fast, why = cpu_bf16_is_fast(frozenset({"avx2", "fma"}))
    assert not fast and "lacks" in why


def test_cpu_flags_parse_proc_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(f) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu_flags(tmp_path / "missing") is None


def test_auto_follows_this_cpu_and_accelerators():
    fast, _ = cpu_bf16_is_fast(cpu_flags()) if cpu_flags() is not None else (None, "")
    got = resolve_dtype("auto", "cpu")
    if fast is not None:
        assert got is (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16


def test_serve_config_dtype_field():
    assert ServeConfig().dtype == "auto"
    assert ServeConfig(dtype="float32").dtype == "float32"
    with pytest.raises(ConfigError, match="dtype"):
        ServeConfig.build(dtype="fp8")


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: (torch.randn(2 * I, D, generator=g) * 0.2, torch.randn(D, I, generator=g) * 0.2) for e in range(E)}


def test_bf16_group_holds_bf16_and_returns_the_input_dtype():
    w = _weights()
    ref, low = ExpertGroup(D, I), ExpertGroup(D, I, dtype=torch.bfloat16, device="cpu")
    ref.load(0, w)
    low.load(0, w)
    assert low.nbytes() * 2 == ref.nbytes()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, D, generator=g)
    rows, ids, ws = torch.arange(10).repeat_interleave(2), torch.randint(0, E, (20,), generator=g), torch.rand(20)
    exact = ref.forward(0, x, rows, ids, ws)
    out32 = low.forward(0, x, rows, ids, ws)
    assert out32.dtype is torch.float32
    assert low.forward(0, x.bfloat16(), rows, ids, ws).dtype is torch.bfloat16
    assert low.forward(0, x, rows, ids, ws, out_dtype=torch.bfloat16).dtype is torch.bfloat16
    rel = (out32 - exact).norm() / exact.norm()
    assert rel < 2e-2, f"bf16 experts: relative error {rel:.3g}"
