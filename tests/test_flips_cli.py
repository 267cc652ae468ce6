"""`python -m moe_impl flips` (moe_impl/cli/flips.py, moe_impl/train/flips.py) on tiny trained runs,
and gpu-check's gate-precision function (moe_impl/gpucheck/gate_precision.py) at toy size on the
CPU."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HIER_16, TINY, set_args

from moe_impl.cli import main
from moe_impl.gpucheck.gate_precision import check_gate_precision
from moe_impl.gpucheck.sizes import QUICK

pytestmark = pytest.mark.integration  # two tiny training runs: seconds


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained flat and a trained hierarchical TINY run."""
    root = tmp_path_factory.mktemp("flips")
    for name, more in (("flat", []), ("hier", HIER_16)):
        assert main(["train", "--out", str(root / name), *set_args([*TINY, *more])]) == 0
    return root


def test_flips_prints_one_result_per_run_and_precision(runs, capsys):
    args = ["flips", "--run-dir", str(runs / "flat"), "--run-dir", str(runs / "hier"), "--json"]
    assert main([*args, "--tokens", "300"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["run_dir"] for r in results] == [str(runs / "flat"), str(runs / "hier")]
    for r, slots in zip(results, (2, 4), strict=True):  # TINY: k = 2; HIER_16: k = 2 + 2
        assert r["choices"] == r["tokens"] * slots > 0
        assert set(r["flips"]) == {"bf16", "tf32"}
        assert r["flips"]["tf32"]["flipped"] == 0  # float32 on a CPU
        assert 0 <= r["flips"]["bf16"]["share"] < 0.5


def test_flips_refuses_a_run_without_a_checkpoint(tmp_path, capsys):
    assert main(["flips", "--run-dir", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_gpu_check_gate_precision_runs_at_toy_size_on_the_cpu(runs):
    result = check_gate_precision(torch.device("cpu"), QUICK, [runs / "hier"])
    assert result["logit_errors"]["tf32 differs from float32"] is False  # no TF32 on a CPU
    (row,) = result["layers"]
    assert row["tf32_flip_share"] == 0.0 and row["float32_step_ms"] > 0
    assert result["runs"][0]["flips"]["tf32"]["flipped"] == 0
