"""Reliability of a run's identity: `--resume` continues a run by the values of its saved config
(not the YAML text), refuses a real change naming each key with its saved and new values, and
`--replace-changed` sets a changed run aside (kept, hidden from collect) and starts a new one; in
the workflow an edited training config re-trains the runs it changes and keeps the old ones aside.

Unit tier: tiny in-process runs (a shared killed run and a finished one, copied per test); the
workflow test (slow) runs the smoke config twice in a copy of the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import (
    SNAKEMAKE,
    TINY,
    copy_run,
    job_counts,
    losses,
    set_args,
    snakemake,
    tiny,
    whole_and_killed,
    workdir,
)

from moe_impl.cli import main
from moe_impl.runs import rundir
from moe_impl.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
SETS = set_args(TINY)  # the TINY run as command-line overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A finished TINY run ("whole") and the same run killed before step 8 ("killed")."""
    return whole_and_killed(tmp_path_factory.mktemp("runs"))


def copy(runs: dict, which: str, tmp_path: Path) -> Path:
    return copy_run(runs, which, tmp_path)


def aside(run_dir: Path) -> list[Path]:
    """The run directories `--replace-changed` set aside from run_dir."""
    return sorted(run_dir.parent.glob(f".{run_dir.name}.replaced-*"))


def read_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / rundir.CONFIG_FILE).read_text())


def assert_finished_like_whole(run_dir: Path, runs: dict) -> None:
    """Resumed to the end: every step logged once, the losses of the uninterrupted run."""
    summary = json.loads((run_dir / rundir.SUMMARY_FILE).read_text())
    assert summary["steps"] == 12
    assert losses(run_dir) == losses(runs["whole"])


# --- resume by value ----------------------------------------------------------------------------


def test_resume_needs_only_out(runs, tmp_path):
    out = copy(runs, "killed", tmp_path)
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert_finished_like_whole(out, runs)


def test_resume_with_the_saved_config_file(runs, tmp_path):
    out = copy(runs, "killed", tmp_path)
    saved = out / rundir.CONFIG_FILE
    assert main(["train", "--config", str(saved), "--out", str(out), "--resume"]) == 0
    assert_finished_like_whole(out, runs)


def test_resume_repeating_a_default_value(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    again = [*SETS, "--set", "train.clip_norm=1.0", "--set", "telemetry.interval_s=1"]
    assert main(["train", "--out", str(out), *again, "--resume"]) == 0, capsys.readouterr().err
    assert_finished_like_whole(out, runs)


def test_resume_may_change_how_the_run_executes(runs, tmp_path, capsys):
    """train.threads and train.progress say how a segment runs, not what it computes."""
    out = copy(runs, "killed", tmp_path)
    more = ["--set", "train.threads=2", "--set", "train.progress=lines"]
    assert main(["train", "--out", str(out), *SETS, *more, "--resume"]) == 0, capsys.readouterr()
    assert_finished_like_whole(out, runs)
    assert not aside(out)


def test_a_changed_config_is_refused_naming_each_key_and_both_values(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    changed = [*SETS, "--set", "train.lr=0.02", "--set", "model.k=1"]
    assert main(["train", "--out", str(out), *changed, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config differs from the run in") and err.count("\n") == 1
    assert "model.k 2 -> 1" in err and "train.lr 0.01 -> 0.02" in err
    assert "--replace-changed" in err and "new --out" in err
    after = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before and not aside(out)
    with pytest.raises(ValueError, match=r"config differs .*: train\.lr 0\.01 -> 0\.02"):
        Trainer(tiny("train.lr=0.02"), out, resume=True)


def test_replace_changed_sets_the_old_run_aside_and_starts_anew(runs, tmp_path, capsys):
    out = copy(runs, "whole", tmp_path)
    old_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    old_run_id = json.loads((out / rundir.RUN_FILE).read_text())["run_id"]
    changed = [*SETS, "--set", "train.lr=0.02"]
    assert main(["train", "--out", str(out), *changed, "--resume", "--replace-changed"]) == 0
    (old,) = aside(out)
    assert re.fullmatch(r"\.run\.replaced-\d{8}T\d{6}Z(-\d+)?", old.name)
    assert str(old) in capsys.readouterr().err  # says where the old run went
    # the old run is kept whole, the new one started from step 0 with the new config
    assert sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file()) == old_files
    assert read_config(old)["train"]["lr"] == 0.01 and losses(old) == losses(runs["whole"])
    assert read_config(out)["train"]["lr"] == 0.02
    assert json.loads((out / rundir.RUN_FILE).read_text())["run_id"] != old_run_id
    new = losses(out)
    assert len(new) == 12 and new[0] == losses(old)[0] and new[1:] != losses(old)[1:]
    # the analysis sees one run in the folder: the hidden old one is not collected
    from analysis.io import find_run_dirs

    assert find_run_dirs(tmp_path) == ([out], [])


def test_replace_changed_resumes_an_unchanged_run(runs, tmp_path):
    out = copy(runs, "killed", tmp_path)
    assert main(["train", "--out", str(out), *SETS, "--resume", "--replace-changed"]) == 0
    assert_finished_like_whole(out, runs)
    assert not aside(out)


def test_the_workflow_fingerprint_is_the_config_values():
    """What the workflow's train rule records to rerun exactly the runs whose config changed."""
    from moe_impl.train.identity import fingerprint

    base = fingerprint(tiny())
    assert fingerprint(tiny("train.clip_norm=1.0", "train.threads=3")) == base
    assert fingerprint(tiny("train.lr=0.02")) != base


# --- the workflow -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake (the `workflow` extra) not installed")
def test_an_edited_training_config_retrains_and_keeps_the_old_runs(tmp_path):
    """After a finished smoke workflow, `lr: 0.01` -> `lr: 0.02` in
    config/train/smoke.yaml and the same command again re-trains every run and exits 0; the old
    run directories, summary.json included, are kept aside."""
    workdir(tmp_path)
    command = ["--cores", "2", "--configfile", "config/smoke.yaml"]
    proc = snakemake(tmp_path, *command, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "results/runs").glob("*/*/summary.json"))
    assert runs
    first = {d: (d / rundir.SUMMARY_FILE).read_text() for d in runs}

    train_config = tmp_path / "config/train/smoke.yaml"
    text = train_config.read_text()
    assert "  lr: 0.01\n" in text
    train_config.write_text(text.replace("  lr: 0.01\n", "  lr: 0.02\n"))
    proc = snakemake(tmp_path, *command, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for d in runs:
        assert read_config(d)["train"]["lr"] == 0.02, d
        assert json.loads((d / rundir.SUMMARY_FILE).read_text())["steps"] > 0
        (old,) = aside(d)
        assert read_config(old)["train"]["lr"] == 0.01
        assert (old / rundir.SUMMARY_FILE).read_text() == first[d]  # nothing finished is lost
    summary_csv = (tmp_path / "results/summary.csv").read_text().splitlines()
    assert len(summary_csv) == 1 + len(runs)  # the old runs are not collected

    # an edit that changes no run's values (a comment) re-trains nothing
    train_config.write_text(train_config.read_text() + "# a comment\n")
    proc = snakemake(tmp_path, "-n", *command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout).get("train", 0) == 0, proc.stdout[-3000:]
