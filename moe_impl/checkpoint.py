"""Checkpoints of a training run: `RUN_DIR/checkpoints/step-NNNNNNNN.pt`, newest named in latest.txt.

A checkpoint is written to a temporary file and renamed, and latest.txt is replaced after it, so a
run killed at any moment leaves the previous checkpoint intact and named. Only the newest `keep`
are kept. Loading maps tensors to the requested device; sparse expert states are plain tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe_impl.rundir import CHECKPOINT_DIR

LATEST = "latest.txt"


def save(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    latest_tmp = folder / (LATEST + ".tmp")
    latest_tmp.write_text(path.name + "\n")
    os.replace(latest_tmp, folder / LATEST)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    marker = folder / LATEST
    if marker.exists():
        path = folder / marker.read_text().strip()
        if path.exists():
            return path
    # killed between writing a checkpoint and naming it: the newest complete file (a partial one
    # still has its .tmp name)
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=False)
