"""Workflow reliability, round two (issue 32): two workflow configs in one directory each get a
report of their own runs only. `snakemake --configfile A.yaml`, then `--configfile B.yaml` in the
same clone (the documented `make smoke` then `make reproduce`): B's collect reads exactly the run
directories B plans (workflow/rules/analysis.smk passes them to `analysis collect --runs`), so A's
runs, still in results/runs, never reach B's summary.csv, tables or REPORT.md, and running A again
brings its own report back. `make reproduce CONFIG=<a missing file>` is one line.

The MLflow store deleted mid-workflow: the run directories are the source of truth, so the rerun's
`tracking_sync` step (`python -m moe_impl tracking sync`, before the figures) imports what the new
store lacks, and every run of the config is in MLflow again without a manual `tracking import`.

Integration tier: real snakemake runs of two one-model configs up to `collect` (seconds of
training each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SNAKEMAKE, snakemake, workdir

from analysis import io

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not SNAKEMAKE.exists(), reason="snakemake (the `workflow` extra) not installed"
    ),
]

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train.tokens": 512, "eval.tokens": 256, "eval.at_tokens": [], "tracking.enabled": False}


def one_model_config(wd, name: str, *models: str, tracked: bool = False) -> str:
    """A workflow config whose runs are lm1b/<model> for each model, at toy size."""
    cfg = {
        "train_config": "config/train/smoke.yaml",
        "experiment": f"moe-{name}",
        "presets": "cpu/",
        "threads_per_run": 1,
        "sweeps": {"lm1b": {"models": list(models), "set": {**TINY, "tracking.enabled": tracked}}},
        "bench": {"experts": ["4"], "tokens": 64},
    }
    path = wd / "config" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"config/{name}.yaml"


def collected(wd, configfile: str) -> list[str]:
    proc = snakemake(
        wd, "--cores", "2", "--configfile", configfile, "--until", "collect", timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted(io.read_csv(wd / "results" / "summary.csv")["name"])


def test_two_configs_in_one_directory_each_collect_their_own_runs(tmp_path):
    wd = workdir(tmp_path)
    a = one_model_config(wd, "a", "MoE-4")
    b = one_model_config(wd, "b", "4xLSTM-64")
    assert collected(wd, a) == ["MoE-4"]
    assert collected(wd, b) == ["4xLSTM-64"]  # A's run is still in results/runs, and left out
    assert (wd / "results" / "runs" / "lm1b" / "MoE-4" / "summary.json").is_file()
    assert collected(wd, a) == ["MoE-4"]  # A's own report again, without retraining


def test_make_reproduce_with_a_missing_config_is_one_line(tmp_path):
    """`make reproduce CONFIG=nonexistent.yaml`: one line naming it, before any install or
    Snakemake (which would print a 20-line traceback); -n so that nothing could run here."""
    missing = tmp_path / "nonexistent.yaml"
    proc = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "reproduce", f"CONFIG={missing}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"CONFIG={missing}: no such file" in lines[0], proc.stderr
    ok = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "reproduce", "CONFIG=config/smoke.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "--configfile config/smoke.yaml" in ok.stdout, ok.stderr


def run_names(uri: str, experiment: str) -> set[str]:
    """The finished MLflow runs of the experiment, read by a fresh process: MLflow caches a
    store's connection per URI in a process, which would still read a deleted file."""
    code = (
        "import sys, tempfile; from moe_impl.tracking import export_runs; "
        "print('\\n'.join(e['run_name'] for e in export_runs(sys.argv[2], tempfile.mkdtemp(), "
        "tracking_uri=sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, uri, experiment], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_a_store_deleted_mid_workflow_is_brought_up_to_date(tmp_path):
    wd = workdir(tmp_path)
    config = one_model_config(wd, "tracked", "MoE-4", "4xLSTM-64", tracked=True)
    first = "results/runs/lm1b/MoE-4/summary.json"
    proc = snakemake(wd, first, "--cores", "2", "--configfile", config, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = wd / "results" / "mlflow.db"
    uri = f"sqlite:///{store}"
    assert run_names(uri, "moe-tracked") == {"lm1b/MoE-4"}
    store.unlink()  # the user deletes the store; MoE-4's run directory is all that is left of it
    proc = snakemake(
        wd, "results/mlflow.synced", "--cores", "2", "--configfile", config, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run_names(uri, "moe-tracked") == {"lm1b/MoE-4", "lm1b/4xLSTM-64"}
    log = (wd / "logs" / "tracking_sync.log").read_text()
    assert "2 of 2 tracked run directories in MLflow" in log, log
