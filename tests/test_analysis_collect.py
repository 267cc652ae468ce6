"""analysis/collect.py: run directories and MLflow give the same tidy frames, the model's structure
comes from the summary (or the config, resolved the same), and one real tiny training run (a few
seconds) for the true file layout."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml
from analysis_runs import good_runs, make_run, write_run

from analysis import collect
from moe_impl import cli as moe_cli
from moe_impl import tracking
from moe_impl.runs import rundir, runinfo


def test_collect_gives_the_tidy_contract(tmp_path):
    runs = good_runs()
    for run in runs:
        write_run(tmp_path / "runs", run)
    (tmp_path / "runs" / "unfinished").mkdir()
    runinfo.write_run_identity(tmp_path / "runs" / "unfinished", "x", "moe")
    data, unfinished = collect.collect_runs(tmp_path / "runs")
    assert [(s.run_dir.name, s.why) for s in unfinished] == [
        ("unfinished", "unfinished, no summary.json")
    ]
    s = data.summary
    assert len(s) == len(runs) and s["run_id"].is_unique
    assert list(s.columns[: len(collect.IDENTITY_COLUMNS)]) == collect.IDENTITY_COLUMNS
    assert set(rundir.SUMMARY_KEYS) <= set(s.columns) and "corpus.vocab_size" in s
    assert not any(c.startswith("model.") for c in s.columns)  # the structure columns have it
    h = s[(s["model"] == "MoE-131072-h")].iloc[0]
    assert (h["family"], h["num_groups"], h["group_size"], h["k"]) == (
        "hierarchical MoE",
        256,
        512,
        4,
    )
    assert s.loc[s["model"] == "4xLSTM-64", "paper_model"].iloc[0] == "4xLSTM-512"
    snaps = data.snapshots
    assert len(snaps) == len(runs) + 6  # a final evaluation each, 6 news100b snapshots
    assert set(snaps["kind"]) == {"snapshot", "final"}
    assert len(data.loads) == 2 * 256


def test_collect_reads_the_model_from_the_summary():
    run = make_run("lm1b", "cpu/MoE-32", 120.0)
    h = {
        **run["summary"]["model"],
        "name": "MoE-8x8-h",
        "moe": "hierarchical",
        "num_experts": 64,
        "num_groups": 8,
        "group_size": 8,
        "k": None,
        "k_primary": 2,
        "k_secondary": 1,
    }
    run["summary"]["model"] = h  # differs from the config's preset: the summary wins
    row = collect.run_record(run)
    assert (row["model"], row["family"], row["moe"], row["num_experts"]) == (
        "MoE-8x8-h",
        "hierarchical MoE",
        "hierarchical",
        64,
    )
    assert (row["num_groups"], row["group_size"], row["k"]) == (8, 8, 2)
    assert row["d_model"] == h["d_model"] and row["d_hidden"] == h["d_hidden"]


@pytest.mark.parametrize(
    "preset", ["cpu/4xLSTM-64", "cpu/MoE-1-Wide", "cpu/MoE-32", "cpu/MoE-1024-h"]
)
def test_a_summary_without_model_resolves_the_config_the_same(preset):
    run = make_run("lm1b", preset, 120.0)
    legacy = {**run, "summary": {k: v for k, v in run["summary"].items() if k != "model"}}
    cols = collect.IDENTITY_COLUMNS
    assert {k: collect.run_record(legacy)[k] for k in cols} == {
        k: collect.run_record(run)[k] for k in cols
    }


def test_paper_rows_take_their_structure_from_the_preset():
    presets = ["lm1b/MoE-256-h", "lm1b/4xLSTM-512", "lm1b/MoE-1-Deep", "news100b/MoE-32"]
    assert collect.paper_structure(presets) == {
        "moe": ["hierarchical", "none", "dense", "flat"],
        "num_experts": [256, 0, 1, 32],
        "family": ["hierarchical MoE", "baseline", "baseline", "flat MoE"],
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real training run (~3 s): an 8-expert flat MoE with a snapshot at 256 tokens."""
    out = tmp_path_factory.mktemp("runs") / "news100b" / "tiny"
    rc = moe_cli.main(
        [
            "train",
            "--out",
            str(out),
            "--set",
            "model.preset=cpu/MoE-4",
            *[
                f"--set={s}"
                for s in (
                    "sweep=news100b",
                    "model.num_experts=8",
                    "model.d_model=16",
                    "model.lstm_layers=[[16, null], [16, null]]",
                    "model.d_hidden=16",
                    "data.synthetic.vocab_size=48",
                    "data.synthetic.num_topics=4",
                    "data.synthetic.max_len=40",
                    "train.batch_size=4",
                    "train.seq_len=16",
                    "train.tokens=512",
                    "train.warmup_steps=2",
                    "train.progress=none",
                    "train.threads=1",
                    "eval.tokens=128",
                    "eval.batch_size=4",
                    "eval.seq_len=16",
                    "eval.at_tokens=[128]",
                    "tracking.enabled=false",
                    "telemetry.peak_flops=1e11",
                )
            ],
        ]
    )
    assert rc == 0
    return out


@pytest.mark.integration
def test_collect_reads_a_real_run_directory(tiny_run):
    data, _ = collect.collect_runs(tiny_run.parent)
    row = data.summary.iloc[0]
    summary = rundir.read_summary(tiny_run)
    assert (row["sweep"], row["model"], row["num_experts"], row["moe"]) == (
        "news100b",
        "MoE-8",
        8,
        "flat",
    )
    assert row["test_perplexity"] == summary["test_perplexity"]
    snaps = data.snapshots.sort_values("tokens")
    assert list(snaps["kind"]) == ["snapshot", "final"] and snaps["tokens"].iloc[0] == 128
    assert len(data.loads) == 8 and data.loads["tokens"].sum() > 0
    el = collect.early_late(data.summary, data.snapshots, "news100b")
    assert el["gap"].iloc[0] == pytest.approx(snaps["perplexity"].iloc[0] - row["test_perplexity"])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating one costs seconds)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.mark.integration
def test_collect_from_mlflow_equals_collect_from_run_dirs(tmp_path, tiny_run, store):
    root = tmp_path / "runs"
    for run in good_runs()[:3]:
        write_run(root, run)
    shutil.copytree(
        tiny_run, root / "news100b" / "tiny", ignore=shutil.ignore_patterns("checkpoints")
    )
    tracking.import_runs(
        sorted(p for p in root.glob("*/*")), experiment="imported", tracking_uri=store
    )
    direct, _ = collect.collect_runs(root)
    exports = tracking.export_runs("imported", tmp_path / "scratch", tracking_uri=store)
    via = collect.frames(collect.run_from_mlflow(e) for e in exports)  # = collect_mlflow
    pd.testing.assert_frame_equal(
        direct.summary.drop(columns="run_dir"), via.summary.drop(columns="run_dir")
    )
    pd.testing.assert_frame_equal(direct.snapshots, via.snapshots)
    # without the artifacts, params + metrics give the same numbers
    bare = collect.frames(collect.run_from_mlflow({**e, "dir": None}) for e in exports)
    cols = ["run_id", "sweep", "model", "num_experts", "test_perplexity", "w_load"]
    pd.testing.assert_frame_equal(direct.summary[cols], bare.summary[cols], check_dtype=False)
    pd.testing.assert_frame_equal(
        direct.snapshots[["run_id", "kind", "tokens", "perplexity"]],
        bare.snapshots[["run_id", "kind", "tokens", "perplexity"]],
        check_dtype=False,
    )


def test_config_yaml_written_by_write_run_is_a_full_config(tmp_path):
    path = write_run(tmp_path, make_run("lm1b", "cpu/MoE-32", 100.0))
    cfg = yaml.safe_load((path / rundir.CONFIG_FILE).read_text())
    assert cfg["model"]["preset"] == "cpu/MoE-32" and cfg["sweep"] == "lm1b"


@pytest.mark.parametrize("prefix", ["cpu/", "gpu/"])
def test_every_scaled_down_model_is_a_figure_2_model_of_the_paper(prefix):
    """The cpu/ and gpu/ families' models stand for Figure 2-left's (the LSTM baselines under the
    paper's name, collect.PAPER_NAME), so the figures and tables put each beside its paper row;
    the cpu/ family's budget models stand for Figure 2-right's, but for one intermediate LSTM."""
    from analysis import paper
    from moe_impl.model.presets import ALL_PRESETS

    names = [cfg.name for p, cfg in ALL_PRESETS.items() if p.startswith(prefix)]
    figure2 = {name for names in paper.FIGURE2_LEFT.values() for name in names}
    right = {m.rstrip("*") for m in paper.figure2_right_series()["model"]}
    covered = {collect.PAPER_NAME.get(name, name) for name in names}
    assert figure2 <= covered, sorted(figure2 - covered)
    if prefix == "cpu/":
        assert {"2xLSTM-8192-1024", "MoE-34M", "MoE-143M"} <= covered
    stand_ins = figure2 | right | {"LSTM-512-128"}
    assert all(collect.PAPER_NAME.get(n, n) in stand_ins or n.startswith("MoE-") for n in names)
