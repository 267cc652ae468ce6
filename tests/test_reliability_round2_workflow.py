"""Workflow reliability, round two (issue 32): two workflow configs in one directory each get a
report of their own runs only. `snakemake --configfile A.yaml`, then `--configfile B.yaml` in the
same clone (the documented `make smoke` then `make reproduce`): B's collect reads exactly the run
directories B plans (workflow/rules/analysis.smk passes them to `analysis collect --runs`), so A's
runs, still in results/runs, never reach B's summary.csv, tables or REPORT.md, and running A again
brings its own report back. `make reproduce CONFIG=<a missing file>` is one line.

Integration tier: real snakemake runs of two one-model configs up to `collect` (seconds of
training each)."""

from __future__ import annotations

import subprocess
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


def one_model_config(wd, name: str, model: str) -> str:
    """A workflow config whose only run is lm1b/<model>, at toy size."""
    cfg = {
        "train_config": "config/train/smoke.yaml",
        "experiment": f"moe-{name}",
        "presets": "cpu/",
        "threads_per_run": 1,
        "sweeps": {"lm1b": {"models": [model], "set": TINY}},
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
