"""analysis/cli.py: `collect` and `figures` write their files from run directories (and MLflow), and
bad input is one line with exit code 2."""

from __future__ import annotations

import pandas as pd
import pytest
from analysis_runs import bench_frame, good_runs, write_run

from analysis import cli, figures, io
from moe_impl import tracking


def _cli_inputs(tmp_path):
    for run in good_runs():
        write_run(tmp_path / "runs", run)
    bench = tmp_path / "bench.json"
    bench.write_text(bench_frame().to_json(orient="records"))
    out = tmp_path / "results"
    assert (
        cli.main(["collect", "--runs", str(tmp_path / "runs"), "--out", str(out / "summary.csv")])
        == 0
    )
    return out, bench


def _run_figures(out, bench, *extra: str) -> int:
    """`figures` on _cli_inputs' summary and bench, writing under out."""
    inputs = ["--summary", str(out / "summary.csv"), "--bench", str(bench), "--out", str(out)]
    return cli.main(["figures", *inputs, *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating one costs seconds)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.mark.integration
def test_cli_writes_figures_tables_and_report(tmp_path, monkeypatch):
    """Two figures here (drawing all six takes ~7 s; the slow test below draws them all)."""
    out, bench = _cli_inputs(tmp_path)
    monkeypatch.setattr(io, "FIGURE_DPI", 40)  # a small test scale: the files, not their looks
    only = ["figure3", "perf_scaling"]
    assert _run_figures(out, bench, "--no-mlflow", "--only", *only) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        f"{n}.{e}" for n in only for e in sorted(io.FIGURE_FORMATS)
    ]
    for name in only:
        for ext in io.FIGURE_FORMATS:
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    for name in ("table6", "table7", "table8"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 100
    assert "**reproduced**" in (out / "REPORT.md").read_text()
    assert not (out / "analysis").exists()


@pytest.mark.slow
def test_cli_logs_the_analysis_run_and_collects_from_mlflow(tmp_path, store, monkeypatch):
    out, bench = _cli_inputs(tmp_path)
    monkeypatch.setattr(io, "FIGURE_DPI", 40)
    assert _run_figures(out, bench, "--uri", store) == 0
    for name in figures.FIGURES:
        for ext in io.FIGURE_FORMATS:
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    exports = tracking.export_runs("analysis", tmp_path / "dl", tracking_uri=store)
    assert len(exports) == 1 and exports[0]["metrics"]["claim.balance"] == 1.0
    assert (exports[0]["dir"] / "figures" / "figure3.png").is_file()
    assert (exports[0]["dir"] / "REPORT.md").is_file()
    tracking.import_runs(
        sorted((tmp_path / "runs").glob("*/*")), experiment="cli", tracking_uri=store
    )
    csv = tmp_path / "mlflow" / "summary.csv"
    assert cli.main(["collect", "--from-mlflow", "cli", "--uri", store, "--out", str(csv)]) == 0
    a, b = io.read_csv(out / "summary.csv"), io.read_csv(csv)
    pd.testing.assert_frame_equal(a.drop(columns="run_dir"), b.drop(columns="run_dir"))


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["collect", "--runs", str(tmp_path / "nope")]) == 2
    assert cli.main(["collect", "--runs", str(tmp_path)]) == 2  # no finished run
    assert cli.main(["figures", "--summary", str(tmp_path / "none.csv"), "--no-mlflow"]) == 2
    bad = tmp_path / "s.csv"
    bad.write_text("run_id\n")
    assert cli.main(["figures", "--summary", str(bad), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
