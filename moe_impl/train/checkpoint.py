"""Checkpoints of a training run: `RUN_DIR/checkpoints/step-NNNNNNNN.pt`, newest named in latest.txt.

A checkpoint is written to a temporary file and renamed, and latest.txt is replaced after it, so a
run killed at any moment leaves the previous checkpoint intact and named. Only the newest `keep`
are kept. Loading maps tensors to the requested device; sparse expert states are plain tensors.

An expert-parallel run (moe_impl/parallel) writes one folder per checkpoint,
`step-NNNNNNNN/rank-RRRRR-of-WWWWW.pt`: each rank its own shard of the experts, rank 0 also the
replicated rest (moe_impl/parallel/shard_state.py). Rank 0 names the folder in latest.txt once
every rank has written (the caller passes a barrier). A folder missing a rank's file is incomplete
and never chosen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moe_impl.runs.rundir import CHECKPOINT_DIR

LATEST = "latest.txt"


def _rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.pt"


def _atomic_save(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save(
    run_dir: str | Path,
    step: int,
    state: dict,
    keep: int = 2,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write this process's checkpoint of `step`; with world_size > 1 every rank must call it."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        path = folder / f"step-{step:08d}.pt"
        _atomic_save(state, path)
    else:
        path = folder / f"step-{step:08d}"
        path.mkdir(exist_ok=True)
        _atomic_save(state, path / _rank_file(rank, world_size))
        if rank == 0:  # files of a run with another process count that was killed at this step
            for stale in path.glob("rank-*-of-*"):  # (.tmp files of this run's ranks stay)
                if stale.name.split("-of-")[1][:5] != f"{world_size:05d}":
                    stale.unlink(missing_ok=True)
        barrier()  # every shard is on disk before the folder is named
    if rank == 0:
        latest_tmp = folder / (LATEST + ".tmp")
        latest_tmp.write_text(path.name + "\n")
        os.replace(latest_tmp, folder / LATEST)
        _prune(folder, keep)
    barrier()  # nobody reads latest.txt (or resumes) before it names this step
    return path


def _step_of(path: Path) -> int:
    return int(path.name[len("step-") :][:8])


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove everything older (complete or not:
    partial folders and .tmp files of killed runs too)."""
    kept = _complete(folder)[-keep:]
    if not kept:
        return
    oldest = _step_of(kept[0])
    for entry in folder.glob("step-*"):
        if _step_of(entry) < oldest:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)


def _complete_world_size(path: Path) -> int | None:
    """How many processes wrote a complete checkpoint at `path` (1 for a .pt file); None when it
    is incomplete (a .tmp file, or a folder without all W rank files for any W)."""
    if path.is_file():
        return 1 if path.suffix == ".pt" else None
    found: dict[int, set[int]] = {}
    for f in path.glob("rank-*-of-*.pt"):
        _, rank, _, world = f.stem.split("-")
        found.setdefault(int(world), set()).add(int(rank))
    complete = [w for w, ranks in found.items() if ranks == set(range(w))]
    return max(complete) if complete else None


def _is_complete(path: Path) -> bool:
    return _complete_world_size(path) is not None


def _complete(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("step-*")) if _is_complete(p)]


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a file, or a folder of rank files), or None."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    marker = folder / LATEST
    if marker.exists():
        path = folder / marker.read_text().strip()
        if path.exists() and _is_complete(path):
            return path
    # killed between writing a checkpoint and naming it: the newest complete one (a partial file
    # still has its .tmp name; a partial folder lacks some rank's file)
    found = _complete(folder)
    return found[-1] if found else None


def world_size_of(path: str | Path) -> int:
    """How many processes wrote a checkpoint (1 for a single file)."""
    world_size = _complete_world_size(Path(path))
    if world_size is None:
        raise ValueError(
            f"checkpoint {str(path)!r} is incomplete (a process did not write its file)"
        )
    return world_size


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    rank: int = 0,
    world_size: int = 1,
    mmap: bool = False,
) -> dict:
    """One process's file of a checkpoint (`rank` of `world_size`); ValueError if the checkpoint was
    written by another number of processes (the trainer then reads every file and reshards,
    moe_impl.parallel.shard_state)."""
    path = Path(path)
    if path.is_dir():
        file = path / _rank_file(rank, world_size)
        if not file.exists():
            found = sorted(f.name for f in path.glob("rank-*.pt"))
            raise ValueError(
                f"checkpoint {str(path)!r} holds {', '.join(found) or 'no rank files'}: resume it "
                f"with the number of processes that wrote it, not {world_size}"
            )
        path = file
    elif world_size != 1:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by a single process; resume it with one "
            f"process, not {world_size}"
        )
    # mmap: tensors are read from the file as they are used (a rank reading rank 0's file for the
    # replicated layers does not hold all of it in memory)
    return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
