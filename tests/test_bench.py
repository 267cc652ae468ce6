"""`python -m moe_impl bench`: --experts parsing, the FLOP formula, reporting, and one tiny end-to-end
run. No timing assertions: timing targets live in the benchmark's output, never in unit tests."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest

from moe_impl.bench import plot as bench_plot
from moe_impl.bench.spec import ExpertSpec, gate_outputs, parse_experts, train_flops
from moe_impl.cli import bench, main

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
            "config": config, "num_experts": n, "num_groups": a, "group_size": b,
            "kind": "flat" if a is None else "hierarchical", "d_model": 8, "d_hidden": 16,
            "tokens": 64, "tokens_mode": "fixed_tokens", "target_tokens_per_expert": None,
            "device": "cpu", "dtype": "float32", "threads": 1, "reps": 1, "warmup": 0,
            "optimizer": False, "status": status, "reason": "",
        }  # fmt: skip
        row.update(dict.fromkeys(bench.MEASURED, 2.0))
        rows.append(row)
    skipped = {**rows[-1], "config": "64-h", "num_experts": 64, "num_groups": 8, "group_size": 8}
    skipped.update(dict.fromkeys(bench.MEASURED, math.nan), status="skipped", reason="too slow")
    return [*rows, skipped]


def test_table_lists_every_row_and_the_skip_reason():
    table = bench_plot.format_table(_synthetic_rows())
    assert "skipped: 64-h: too slow" in table
    assert "4x4" in table and "fixed tokens per step T=64" in table


def test_plot_has_moe_and_dense_series_per_kind():
    fig = bench_plot.plot_bench(_synthetic_rows())
    ax_time, ax_ratio = fig.axes
    assert len(ax_time.lines) == 4  # (flat, hierarchical) x (MoE, dense); the skip is not drawn
    assert len(ax_ratio.lines) == 3  # two kinds plus the ratio-1 reference line


def test_bench_end_to_end_writes_json_csv_png(tmp_path, capsys):
    argv = ["bench", "--experts", "4,16-h", "--tokens", "256", "--reps", "1", "--warmup", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "16-h" in capsys.readouterr().out
    for name in ("bench.json", "bench.csv", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in rows] == ["4", "16-h"]
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert set(bench.MEASURED) <= set(row)
        assert row["ratio_median"] > 0 and row["ratio_min"] > 0
        assert row["tokens"] == 256 and row["params"] > 0
    assert rows[1]["num_groups"] == 4 and rows[1]["group_size"] == 4
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
