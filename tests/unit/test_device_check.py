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
