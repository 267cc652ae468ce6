"""`python -m moe_impl bench`: --experts parsing, the FLOP formula, reporting, and one tiny end-to-end
run. No timing assertions: timing targets live in the benchmark's output, never in unit tests."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import NoWatchdog

from moe_impl import telemetry
from moe_impl.bench import plot as bench_plot
from moe_impl.bench import worker
from moe_impl.bench.spec import ExpertSpec, gate_outputs, parse_experts, train_flops
from moe_impl.cli import bench, main
from moe_impl.layer import experts as experts_module
from moe_impl.model import flops
from moe_impl.model.presets import ALL_PRESETS

# (entry, num_experts, num_groups, group_size)
_EXPERT_CASES = [
    ("4", 4, None, None),
    ("32", 32, None, None),
    ("16-h", 16, 4, 4),
    ("256-h", 256, 16, 16),
    ("1024-h", 1024, 32, 32),
    ("2048-h", 2048, 32, 64),  # a = 2**floor(11/2) = 32
    ("131072-h", 131072, 256, 512),
    ("24-h", 24, 4, 6),
    ("16x64-h", 1024, 16, 64),
    (" 8x2-h ", 16, 8, 2),
]


@pytest.mark.parametrize(("entry", "n", "a", "b"), _EXPERT_CASES)
def test_parse_experts_entry(entry, n, a, b):
    (spec,) = parse_experts(entry)
    assert (spec.num_experts, spec.num_groups, spec.group_size) == (n, a, b)
    assert spec.hierarchical == (a is not None)
    assert spec.config == entry.strip()


def test_parse_experts_list_keeps_order():
    specs = parse_experts("4,256-h,16x64-h")
    assert [s.config for s in specs] == ["4", "256-h", "16x64-h"]


@pytest.mark.parametrize("bad", ["", "abc", "0", "-4", "4-x", "4h", "9-h", "3-h", "1x8-h", "8x1-h"])
def test_parse_experts_rejects_bad_entry_naming_flag_and_value(bad):
    with pytest.raises(ValueError, match="--experts") as err:
        parse_experts(f"4,{bad}")
    assert repr(bad) in str(err.value)


def test_train_flops_hand_computed():
    # tokens=2, d=3, h=5, k=2, n=4 gate outputs:
    # experts 3·2·2·2·(2·3·5) = 720, gate 3·2·2·(2·3·4) = 288
    assert train_flops(2, 3, 5, 2, 4) == 720 + 288
    assert train_flops(2, 3, 5, 2, 0) == 720  # the dense baseline: expert term only


# (d, h, active experts, gate outputs, expert hidden layers, FLOPs per token by hand)
_LAYER_FLOPS_CASES = [
    (3, 5, 2, 4, 1, 6 * (2 * 30 + 24)),  # experts 2·(3·5 + 5·3) = 60, gate 2·3·4 = 24
    (3, 5, 2, 0, 1, 6 * 60),  # no gate: the dense baseline
    (2, 4, 1, 0, 1, 6 * 16),  # one always-active expert
    (2, 4, 4, 4 + 2 * 4, 1, 6 * (4 * 16 + 2 * 2 * 12)),  # 4x4-h, k = 2+2: a + 2·b gate outputs
    (2, 4, 1, 0, 3, 6 * (8 + 2 * 16 + 8)),  # d·h + 2·h·h + h·d (a deep expert, 3 hidden layers)
]


@pytest.mark.parametrize(("d", "h", "active", "gates", "layers", "expected"), _LAYER_FLOPS_CASES)
def test_moe_layer_train_flops_per_token_hand_computed(d, h, active, gates, layers, expected):
    assert flops.moe_layer_train_flops_per_token(d, h, active, gates, layers) == expected


@pytest.mark.parametrize(
    "preset",
    [
        "cpu/MoE-1-Wide",
        "cpu/MoE-32",
        "cpu/MoE-1024-h",
        "gpu/MoE-131072-h",
        "lm1b/MoE-1-Deep",
        "lm1b/MoE-4096-h",
    ],
)
def test_bench_and_training_count_the_moe_layer_alike(preset):
    # the layer's share of train_flops_per_token (training's MFU) is the bench's formula
    cfg = ALL_PRESETS[preset]
    gates = {"flat": cfg.num_experts, "dense": 0}.get(cfg.moe)
    if cfg.moe == "hierarchical":
        gates = gate_outputs(ExpertSpec("", cfg.num_experts, cfg.num_groups, cfg.group_size))
    layer = flops.moe_layer_train_flops_per_token(
        cfg.d_model, cfg.d_hidden, flops.active_experts(cfg), gates, cfg.expert_hidden_layers
    )
    assert layer == 6 * (flops.expert_ops_per_timestep(cfg) + flops.gate_ops(cfg))


@pytest.mark.parametrize(
    ("tokens", "d", "h", "k", "gates"), [(1, 1, 1, 1, 0), (256, 64, 128, 4, 12)]
)
def test_train_flops_is_tokens_times_the_per_token_closed_form(tokens, d, h, k, gates):
    closed_form = 3 * 2 * tokens * (k * 2 * d * h + 2 * d * gates)  # bench's formula until now
    assert train_flops(tokens, d, h, k, gates) == closed_form
    assert closed_form == tokens * flops.moe_layer_train_flops_per_token(d, h, k, gates)


def test_gate_outputs_flat_is_n_hierarchical_is_a_plus_k1_b():
    assert gate_outputs(ExpertSpec("64", 64)) == 64
    assert gate_outputs(ExpertSpec("16x64-h", 1024, 16, 64)) == 16 + 2 * 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "4,foo"], "'foo'"),
        (["--experts", "2"], "--k=4"),
        (["--experts", "4", "--max-tokens", "8"], "--max-tokens"),
        (["--experts", "4", "--reps", "0"], "--reps"),
        (["--experts", "4", "--peers", "nope"], "--peers: unknown peer 'nope'"),
        (["--experts", "4", "--peers-max-experts", "0"], "--peers-max-experts"),
        (["--experts", "4,32", "--kernel", "wide"], "--kernel wide runs flat entries with k = n"),
        (["--experts", "4-h", "--kernel", "wide"], "'4-h' is hierarchical"),
        (["--experts", "4096", "--k", "4096", "--kernel", "wide"], "sparse expert gradients"),
        (["--experts", "4", "--kernel", "wide", "--distributed"], "--kernel applies to the single"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_tokens_per_expert_sets_tokens_from_n_and_caps_them():
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--tokens-per-expert", "8", "--max-tokens", "100"])
    small, large = (bench.make_row(s, args) for s in parse_experts("16,256-h"))
    assert small["tokens"] == math.ceil(8 * 16 / 4) and small["tokens_per_expert"] == 8
    assert large["tokens"] == 100 and large["tokens_mode"] == "fixed_tokens_per_expert"


def _synthetic_rows():
    rows = []
    for config, n, a, b, status in [("4", 4, None, None, "ok"), ("16-h", 16, 4, 4, "ok")]:
        row = {
            "config": config,
            "num_experts": n,
            "num_groups": a,
            "group_size": b,
            "kind": "flat" if a is None else "hierarchical",
            "d_model": 8,
            "d_hidden": 16,
            "tokens": 64,
            "tokens_mode": "fixed_tokens",
            "target_tokens_per_expert": None,
            "device": "cpu",
            "dtype": "float32",
            "threads": 1,
            "reps": 1,
            "warmup": 0,
            "optimizer": False,
            "status": status,
            "reason": "",
        }
        row.update(dict.fromkeys(bench.MEASURED, 2.0))
        rows.append(row)
    skipped = {**rows[-1], "config": "64-h", "num_experts": 64, "num_groups": 8, "group_size": 8}
    skipped.update(dict.fromkeys(bench.MEASURED, math.nan), status="skipped", reason="too slow")
    return [*rows, skipped]


def _parse_table(table: str) -> list[dict[str, str]]:
    """The aligned table's rows as {header: cell}; cells are separated by two or more spaces."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[1].strip())
    rows = []
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break  # the lines after the table
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_table_lists_every_row_and_the_skip_reason():
    table = bench_plot.format_table(_synthetic_rows())
    lines = table.splitlines()
    assert lines[0].startswith("d_model=8 d_hidden=16, fixed tokens per step T=64; cpu float32")
    rows = _parse_table(table)
    assert [r["config"] for r in rows] == ["4", "16-h", "64-h"]
    assert [r["a x b"] for r in rows] == ["-", "4x4", "8x8"]
    flat, hier, skipped = rows
    assert flat["MoE ms med/min"] == "2.0 / 2.0" and flat["ratio med/min"] == "2.00 / 2.00"
    assert flat["MFU"] == "200.0%" and hier["GFLOP/s"] == "2.0" and hier["mem MB"] == "2"
    assert flat["tokens"] == skipped["tokens"] == "64"
    measured = ["MoE ms med/min", "us/tok MoE", "ratio med/min", "GFLOP/s", "MFU", "CV load"]
    assert all(skipped[h] == "-" for h in measured)  # NaN is never printed as a number
    assert lines[-2:] == ["peak for MFU: 2.0 GFLOP/s", "skipped: 64-h moe_impl: too slow"]


def test_plot_has_moe_and_dense_series_per_kind():
    fig = bench_plot.plot_bench(_synthetic_rows())
    ax_time, ax_ratio = fig.axes
    assert len(ax_time.lines) == 4  # (flat, hierarchical) x (MoE, dense); the skip is not drawn
    assert len(ax_ratio.lines) == 3  # two kinds plus the ratio-1 reference line


def _fake_stats(counts: list[float], cv_load: float, max_over_mean: float) -> SimpleNamespace:
    """What the layer's `stats` carries, for summarize."""
    return SimpleNamespace(
        tokens_per_expert=torch.tensor(counts),
        cv_load=torch.tensor(cv_load),
        max_over_mean_load=torch.tensor(max_over_mean),
    )


_SUMMARY_CFG = {"tokens": 8, "k": 2, "d_model": 3, "d_hidden": 5, "device": "cpu"}


@pytest.mark.parametrize("peak", [4e10, 989.4e12, None])
def test_summarize_mfu_is_telemetry_mfu(peak):
    times = {"moe": [0.004, 0.002, 0.003], "dense": [0.002, 0.001, 0.001]}
    stats = [_fake_stats([8, 8, 0, 0], 0.5, 2.0), _fake_stats([4, 4, 4, 4], 0.1, 1.0)]
    row = worker.summarize(_SUMMARY_CFG, 4, times, stats, peak)
    assert list(row) == worker.MEASURED
    moe_flop = train_flops(8, 3, 5, 2, 4)  # 8 tokens x 1008 / 2 FLOPs per token
    assert row["moe_gflops"] == pytest.approx(moe_flop / 0.003 / 1e9)
    assert row["dense_gflops"] == pytest.approx(train_flops(8, 3, 5, 2, 0) / 0.001 / 1e9)
    expected = telemetry.mfu(row["moe_gflops"] / 1e3, peak)  # training's MFU of the same rate
    if peak is None:
        assert math.isnan(row["mfu"]) and math.isnan(row["peak_gflops"]) and math.isnan(expected)
    else:
        assert row["mfu"] == pytest.approx(expected, rel=1e-12)
        assert row["peak_gflops"] == peak / 1e9
    assert (row["moe_ms_median"], row["moe_ms_min"]) == pytest.approx((3.0, 2.0))
    assert row["ratio_median"] == pytest.approx(3.0) and row["ratio_min"] == pytest.approx(2.0)
    assert row["moe_us_per_token"] == pytest.approx(3e3 / 8)
    assert row["active_experts"] == 3.0  # 2 then 4 experts got tokens
    assert row["tokens_per_active_expert"] == pytest.approx((16 / 2 + 16 / 4) / 2)
    assert row["cv_load"] == pytest.approx(0.3) and row["max_over_mean_load"] == pytest.approx(1.5)
    assert row["cv_tokens_per_expert"] == pytest.approx(0.5)  # CV of [8, 8, 0, 0] is 1, of [4]*4 0


def test_measure_takes_the_peak_from_telemetry(monkeypatch):
    asked = []

    def fake_peak(device, dtype):
        asked.append((device, dtype))
        return 5e10, "table:fake"

    monkeypatch.setattr(telemetry, "resolve_peak_flops", fake_peak)
    monkeypatch.setattr(worker.threading, "Timer", NoWatchdog)
    cfg = {
        "config": "4",
        "num_experts": 4,
        "num_groups": None,
        "group_size": None,
        "d_model": 4,
        "d_hidden": 8,
        "k": 2,
        "tokens": 16,
        "seed": 0,
        "reps": 1,
        "warmup": 0,
        "optimizer": False,
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "max_seconds": 60.0,
    }
    row = worker.measure(cfg)
    assert asked == [("cpu", "float32")]
    assert row["peak_gflops"] == 50.0
    assert row["mfu"] == pytest.approx(telemetry.mfu(row["moe_gflops"] / 1e3, 5e10), rel=1e-12)


@pytest.mark.parametrize(("kernel", "wide_calls"), [("wide", 2), ("auto", 0)])
def test_measure_runs_the_kernel_asked_for(monkeypatch, kernel, wide_calls):
    calls = []
    real = experts_module.wide_expert_mlp

    def spy(*args, **kwargs):
        calls.append(kernel)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_module, "wide_expert_mlp", spy)
    monkeypatch.setattr(worker.threading, "Timer", NoWatchdog)
    cfg = {
        **dict(config="4", num_experts=4, num_groups=None, group_size=None, d_model=4),
        **dict(d_hidden=8, k=4, tokens=16, seed=0, reps=1, warmup=1, optimizer=False),
        **dict(device="cpu", dtype="float32", threads=1, max_seconds=60.0, kernel=kernel),
    }
    row = worker.measure(cfg)
    assert len(calls) == wide_calls and row["moe_ms_median"] > 0


@pytest.mark.integration
def test_bench_end_to_end_writes_json_csv_png(tmp_path, capsys):
    argv = ["bench", "--experts", "4,16-h", "--tokens", "256", "--reps", "1", "--warmup", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [r["config"] for r in _parse_table(out)] == ["4", "16-h"]
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in rows] == ["4", "16-h"]
    d, h, tokens = 64, 128, 256
    gates = {"4": 4, "16-h": 4 + 2 * 4}  # flat n; hierarchical a + k_primary·b
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        for key in bench.MEASURED:  # every measurement present, a finite number
            assert isinstance(row[key], float | int) and math.isfinite(row[key]), key
        assert row["k"] == 4 and row["tokens"] == tokens and row["params"] > 0
        assert row["ratio_median"] > 0 and row["ratio_min"] > 0 and row["peak_gflops"] > 0
        moe_flop = 3 * 2 * tokens * (4 * 2 * d * h + 2 * d * gates[row["config"]])
        assert row["train_gflop"] == pytest.approx(moe_flop / 1e9, rel=1e-12)
        assert row["moe_gflops"] * row["moe_ms_median"] / 1e3 == pytest.approx(row["train_gflop"])
        dense_flop = 3 * 2 * tokens * 4 * 2 * d * h
        assert row["dense_gflops"] * row["dense_ms_median"] / 1e3 == pytest.approx(dense_flop / 1e9)
        assert row["ratio_median"] == pytest.approx(row["moe_ms_median"] / row["dense_ms_median"])
        assert row["mfu"] == pytest.approx(row["moe_gflops"] / row["peak_gflops"])
        assert row["tokens_per_expert"] == tokens * 4 / row["num_experts"]
        assert 1 <= row["active_experts"] <= row["num_experts"]
    assert rows[1]["num_groups"] == 4 and rows[1]["group_size"] == 4
    with (tmp_path / "bench.csv").open() as f:
        from_csv = list(csv.DictReader(f))
    assert [r["config"] for r in from_csv] == ["4", "16-h"]
    for row, back in zip(rows, from_csv, strict=True):
        assert set(back) == set(row)
        for key in [*bench.MEASURED, "train_gflop", "tokens", "params"]:
            assert float(back[key]) == pytest.approx(row[key], rel=1e-12), key
