"""The Snakemake workflow parses and plans its jobs (a dry run; the real run is the benchmark)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")  # the `workflow` extra, next to python


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake (the `workflow` extra) not installed")
def test_dry_run_plans_the_benchmark(tmp_path):
    for name in ("Snakefile", "config", "workflow"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    proc = subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rule bench" in proc.stdout and "results/bench/bench.json" in proc.stdout
