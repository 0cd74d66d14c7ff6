"""The device check says so and exits 0 where there is no accelerator."""

import pytest
import torch

from moeray.bench import device_check


def test_without_an_accelerator_it_says_so_and_exits_0(capsys):
    if device_check.find_accelerator() is not None:
        pytest.skip("this machine has an accelerator: the check would run for real")
    assert not torch.cuda.is_available()
    assert device_check.main([]) == 0
    assert "no accelerator here" in capsys.readouterr().out


def test_the_in_process_engine_step_runs_on_the_cpu_and_passes_its_greedy_check():
    """The device check's step 2 on device "cpu" (the same code as on a GPU): fp32, so every greedy token is the
    reference's argmax."""
    from support.tiny_models import build

    path = build("qwen3_moe")
    eng = device_check.engine_on(path, "cpu", torch.float32)
    assert eng.device == torch.device("cpu")
    res = device_check.greedy_check(eng, path, 6)
    assert res["positions"] == 24 and res["within_5e-2"] == 1.0 and res["max_gap"] <= 1e-4
