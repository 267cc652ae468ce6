"""`python -m moe_impl plan` and the estimates behind it (moe_impl/train/plan.py, moe_impl/runs/resources.py).

The rules against closed forms: a measured host peak holds up to the measured tokens per pass and
parameter count, else the analytic estimate never below it; device memory is the run's parameter
state plus the measurement's activations scaled by the positions per forward pass; a step scales
with its positions, and the input costs what it takes beyond the step when made ahead. The plan of
config/gpu.yaml gives back gpu-check run 4's own projection (15.33 hours, inline input) from the
measurements it was made from, and every row's regime is moe_impl.model.regime's. Unit tier."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from moe_impl.cli import main
from moe_impl.model import regime
from moe_impl.runs import resources
from moe_impl.train import plan

ROOT = plan.ROOT


def test_host_memory_follows_the_measurement_where_it_holds():
    peaks = {
        "margin": 1.15,
        "train": {"p/M": {"peak_mib": 1000, "params": 10, "tokens_per_step": 4096, "source": "x"}},
    }
    measured = resources.measured_mem_mb(1000, 1.15)
    assert measured == 1206  # ceil(1000 * 1.048576 * 1.15)
    held = resources.train_mem_mb(peaks, "p/M", params=10, num_experts=4, tokens_per_pass=4096)
    assert held == (measured, "measured: x")
    more = resources.train_mem_mb(peaks, "p/M", params=10, num_experts=4, tokens_per_pass=8192)
    assert more.value == max(measured, resources.analytic_mem_mb(10, 4))
    other = resources.train_mem_mb(peaks, "p/M", params=11, num_experts=4, tokens_per_pass=64)
    assert other == (resources.analytic_mem_mb(11, 4), "analytic")
    # 16 B a parameter with dense Adam, 5 B with sparse gradients from 4096 experts, + 1.5 GB
    assert resources.analytic_mem_mb(10**6, 4) == 1500 + 16  # MB: 10^6 bytes, as mem_mb
    assert resources.analytic_mem_mb(2**20, 4) == 1500 + 16  # 16.78 MB, rounded down
    assert resources.analytic_mem_mb(10**6, 4096) == 1500 + 5


def test_device_memory_scales_the_activations_not_the_parameters():
    entry = {"params": 2**30, "tokens_per_step": 1000, "source": "run"}
    entry["peak_gib"] = 16.0 + 4.0  # 2^30 dense parameters x 16 B, and 4 GiB of activations
    same = resources.device_peak_gib(entry, params=2**30, num_experts=4, tokens_per_pass=1000)
    assert same.value == pytest.approx(20.0) and same.source == "measured run"
    half = resources.device_peak_gib(entry, params=2**30, num_experts=4, tokens_per_pass=500)
    assert half.value == pytest.approx(18.0)
    bigger = resources.device_peak_gib(entry, params=2**31, num_experts=4, tokens_per_pass=1000)
    assert bigger.value == pytest.approx(36.0)  # twice the state, the same activations


def test_device_memory_rule_gives_back_the_measured_131072_expert_peaks():
    """docs/gpu.md's H200 report: MoE-131072-h peaked at 42.8 GiB with 2.2B parameters and at
    65 GiB with twice the expert weights (d_hidden 64); the fitted bytes per parameter give the
    second from the first."""
    entry = {"params": 2216820736, "peak_gib": 42.81, "tokens_per_step": 262144, "source": "run 4"}
    doubled = 2216820736 + 2**31
    peak = resources.device_peak_gib(
        entry, params=doubled, num_experts=131072, tokens_per_pass=262144
    )
    assert peak.value == pytest.approx(65, abs=1.5)
    accumulated = resources.device_peak_gib(
        entry, params=doubled, num_experts=131072, tokens_per_pass=262144, micro_batches=8
    )
    # while a pass's sparse gradient is added and coalesced: two more float32 copies (8 B)
    assert accumulated.value == pytest.approx(peak.value + doubled * 8 / 2**30)


def test_a_step_scales_with_its_positions_and_the_input_overlaps_when_made_ahead():
    entry = {"step_ms": 100.0, "tokens_per_step": 1000, "source": "run"}
    inline = resources.step_seconds(
        entry, tokens_per_step=8000, input_tokens_per_s=4000, prefetch=False
    )
    assert inline.value == pytest.approx(0.8 + 2.0)
    ahead = resources.step_seconds(
        entry, tokens_per_step=8000, input_tokens_per_s=4000, prefetch=True
    )
    assert ahead.value == pytest.approx(2.0)  # the input is the longer: it sets the pace
    fast = resources.step_seconds(
        entry, tokens_per_step=8000, input_tokens_per_s=1e9, prefetch=True
    )
    assert fast.value == pytest.approx(0.8)


# config/gpu.yaml as gpu-check run 4 projected it (docs/gpu_check/): 24 runs of 262,144 positions a step,
# the batches made inline between steps
RUN4 = {
    "train_config": "config/train/gpu.yaml",
    "presets": "gpu/",
    "sweeps": {
        "lm1b": {
            "models": [
                "MoE-4",
                "MoE-32",
                "MoE-256",
                "MoE-256-h",
                "MoE-1024-h",
                "MoE-4096-h",
                "4xLSTM-256",
                "LSTM-1024-256",
                "MoE-1-Wide",
                "MoE-1-Deep",
            ],
            "set": {"train.tokens": 1048576000, "train.prefetch_workers": 0},
        },
        "news100b": {
            "models": [
                "MoE-32",
                "MoE-256-h",
                "MoE-1024-h",
                "MoE-4096-h",
                "MoE-16384-h",
                "MoE-65536-h",
                "MoE-131072-h",
                "4xLSTM-256",
            ],
            "set": {
                "train.tokens": 1572864000,
                "eval.at_tokens": [157286400],
                "train.prefetch_workers": 0,
            },
        },
        "balance": {
            "models": ["MoE-256"],
            "balance_weights": [
                [0.0, 0.0],
                [0.2, 0.0],
                [0.0, 0.2],
                [0.1, 0.1],
                [0.01, 0.01],
                [1.0, 1.0],
            ],
            "set": {"train.tokens": 1048576000, "train.prefetch_workers": 0},
        },
    },
}


def test_the_plan_gives_back_gpu_check_run_4s_projection(tmp_path):
    """gpu-check run 4 projected 15.33 hours for that config with today's generator making the
    batches inline, 427.7 ms each, from the same step times (docs/gpu_check/2026-11-30T2302_run4.md).
    The host-memory file is not in tmp_path: the GPU rows need none."""
    path = tmp_path / "run4.yaml"
    path.write_text(yaml.safe_dump(RUN4))
    times = yaml.safe_load((ROOT / "workflow/resources/step_times.yaml").read_text())
    del times["cuda"]["input"]["speedup"]  # today's generator, as run 4 timed it
    (tmp_path / "step_times.yaml").write_text(yaml.safe_dump(times))
    result = plan.plan(path, root=ROOT, resources_dir=tmp_path)
    assert len(result.rows) == 24 and not result.unestimated
    assert result.total_hours == pytest.approx(15.33, abs=0.02)
    for row in result.rows:  # measured at this very batch: the measured peaks themselves
        assert row.device_peak_gib == pytest.approx(times["cuda"]["models"][row.preset]["peak_gib"])
    assert result.max_device_peak_gib == pytest.approx(42.81)


def test_every_row_carries_the_regime_of_its_model():
    result = plan.plan(ROOT / "config" / "config.yaml")
    row = next(r for r in result.rows if (r.sweep, r.run) == ("lm1b", "MoE-4096-h"))
    assert row.batch_positions == 256 * 64 and row.steps == 1000 and row.micro_batches == 1
    assert row.tokens_per_expert_per_step == pytest.approx(256 * 64 * 4 / 4096)
    assert row.paper_tokens_per_expert_per_step == pytest.approx(
        regime.LM1B_REGIME.batch_positions * 4 / 4096
    )
    assert row.paper_steps == 27000 and row.hours is not None and row.host_mem_mb > 1000


def test_an_unmeasured_model_is_named_not_guessed(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "gpu.yaml").read_text())
    cfg["sweeps"] = {"lm1b": {"models": ["MoE-2048-h"]}}
    cfg["sweeps"]["lm1b"]["models"] = [
        {
            "name": "MoE-2048-h",
            "preset": "MoE-1024-h",
            "set": {"model.num_experts": 2048, "model.group_size": 64},
        },
    ]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = plan.plan(path, root=ROOT)
    assert result.unestimated == ["lm1b/MoE-2048-h"] and result.total_hours == 0
    assert result.rows[0].time_source == "not measured"


def test_the_command_prints_a_table_and_json(capsys):
    assert main(["plan", "--configfile", str(ROOT / "config" / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert "lm1b/MoE-4 " in out and "hours estimated" in out
    assert main(["plan", "--configfile", str(ROOT / "config/gpu.yaml"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"rows", "total_hours", "unestimated", "max_device_peak_gib"} <= set(data)
    row = data["rows"][0]
    for key in ("tokens_per_expert_per_step", "paper_tokens_per_expert_per_step", "hours"):
        assert key in row


def test_a_missing_config_is_one_line(capsys):
    assert main(["plan", "--configfile", "nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: --configfile 'nope.yaml': no such file"


H200_GIB, H100_GIB = 139, 78  # what each card lets a process allocate (about)


def test_the_gpu_reproduction_is_in_the_papers_regime_within_three_hours():
    """Issue 28's bar, by the plan's own estimates: config/gpu.yaml's MoE-131072-h gets at least
    64 positions per expert per step, every run fits one H200, the whole takes at most 3 hours;
    with config/gpu-80gb.yaml over it every run fits an 80 GB card."""
    result = plan.plan([ROOT / "config/gpu.yaml"])
    rows = {f"{r.sweep}/{r.run}": r for r in result.rows}
    largest = rows["news100b/MoE-131072-h"]
    assert largest.tokens_per_expert_per_step >= 64 and largest.micro_batches > 1
    assert result.max_device_peak_gib <= H200_GIB and result.total_hours <= 3
    assert not result.unestimated
    news = [r for r in result.rows if r.sweep == "news100b"]
    assert len({r.batch_positions for r in news}) == 1  # one batch for every model (App. D)
    moe = sorted((r for r in news if r.num_experts > 1), key=lambda r: r.num_experts)
    ratios = [b.params / a.params for a, b in itertools.pairwise(moe[2:])]  # from 1024-h
    assert all(r > 1.9 for r in ratios), ratios  # the parameters grow with the experts (Table 8)
    small = plan.plan([ROOT / "config/gpu.yaml", ROOT / "config/gpu-80gb.yaml"])
    assert small.max_device_peak_gib <= H100_GIB
    assert {r.batch_positions for r in small.rows if r.sweep == "news100b"} == {2**21}
