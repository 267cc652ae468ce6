"""examples/library_speed.py, the docs' plain-import timing script, and compute_copy_speed.py run
at toy size and print a row per configuration (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "library_speed.py"
COPY_SCRIPT = SCRIPT.with_name("compute_copy_speed.py")


def test_library_speed_script_prints_a_row_per_configuration():
    argv = [sys.executable, str(SCRIPT), "--experts", "4,16-h", "--tokens", "64", "--reps", "1"]
    out = subprocess.run([*argv, "--warmup", "0"], capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["4", "16-h"]
    assert all(len(r) == 5 and float(r[4]) > 0 for r in rows)


def test_compute_copy_script_prints_a_row_per_configuration():
    argv = [sys.executable, str(COPY_SCRIPT), "--experts", "4,16-h", "--tokens", "64"]
    argv += ["--reps", "1", "--warmup", "1", "--optimizer", "trainer"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["4", "16-h"]
    assert all(len(r) == 7 and float(r[5]) == 1.0 for r in rows)  # dense Adam: a cast per step
