"""moe_impl/runtime.py: the process settings CPU training turns on (conftest.py restores the
default arithmetic after each test)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from moe_impl import runtime
from moe_impl.train.loop import Trainer

SUBNORMAL = 1e-39  # float32 subnormal: below 2**-126 ≈ 1.18e-38


def test_flushing_treats_subnormals_as_zero():
    x = torch.tensor([SUBNORMAL, 1e-30])
    torch.set_flush_denormal(False)
    assert (x * 1.0)[0] > 0  # kept by default
    if not runtime.flush_denormals():
        pytest.skip("this CPU cannot flush subnormals")
    y = torch.tensor([SUBNORMAL, 1e-30]) * 1.0
    assert y[0] == 0 and y[1] == pytest.approx(1e-30)  # normal values unchanged


def test_a_cpu_trainer_flushes_subnormals(tmp_path):
    """The load loss's CDF gradient underflows into subnormals, which made CPU steps ~2x slower."""
    if not runtime.flush_denormals():
        pytest.skip("this CPU cannot flush subnormals")
    torch.set_flush_denormal(False)
    assert (torch.tensor([SUBNORMAL]) * 1.0)[0] > 0
    Trainer(tiny(), tmp_path / "r")
    assert (torch.tensor([SUBNORMAL]) * 1.0)[0] == 0
