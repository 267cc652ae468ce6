"""Checkpoints of a training run: `RUN_DIR/checkpoints/step-NNNNNNNN.pt`, newest named in latest.txt.

A checkpoint is written to a temporary file, flushed to disk and renamed, and latest.txt is replaced
after it, so a run killed at any moment leaves the previous checkpoint intact and named. Only the
newest `keep` are kept. Loading maps tensors to the requested device; sparse expert states are
plain tensors. A write that fails (a full disk: ENOSPC) removes its temporary file and raises
`CheckpointWriteError`, one line naming the errno and the file.

Every file is verified before it is loaded (`verify`): torch.save writes a zip archive that stores
each record's size and CRC-32, so a truncated, empty or overwritten file, or a flipped bit, is
found without a record of our own, in checkpoints of any age; loading then raises
`DamagedCheckpoint` (one line: the file and what is wrong with it) and never hands torch a bad
file. `candidates` lists what a resume may try, best first (state.resumed_state falls back along it).

An expert-parallel run (moe_impl/parallel) writes one folder per checkpoint,
`step-NNNNNNNN/rank-RRRRR-of-WWWWW.pt`: each rank its own shard of the experts, rank 0 also the
replicated rest (moe_impl/parallel/shard_state.py). Rank 0 names the folder in latest.txt once
every rank has written (the caller passes a barrier). A folder missing a rank's file is incomplete
and never chosen.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from moe_impl.runs.rundir import CHECKPOINT_DIR

LATEST = "latest.txt"
_NAME = re.compile(r"step-\d{8}(\.pt)?")  # what latest.txt may name
_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every file torch.save writes


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is not what torch.save wrote: truncated, empty, not a checkpoint at
    all, or with a record whose CRC-32 does not match (a resume falls back to an older one)."""

    def __init__(self, file: Path, reason: str) -> None:
        self.file, self.reason = Path(file), reason
        super().__init__(f"checkpoint file {str(file)!r} {reason}")


class CheckpointWriteError(ValueError):
    """Writing a checkpoint failed (a full disk, a quota, an I/O error); its temporary file is
    removed and the previous checkpoint is still the one latest.txt names."""


def _rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.pt"


class _Writer:
    """The file torch.save writes through: keeps the OSError of a failed write, which torch turns
    into a RuntimeError without the errno ("basic_ios::clear", "unexpected pos")."""

    def __init__(self, file) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._file.flush()


def _atomic_save(state: dict, path: Path) -> None:
    """Write `path` through `path.tmp` (flushed to disk, then renamed); on an OSError (ENOSPC...)
    the .tmp file is removed and the error re-raised."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)  # type: ignore[arg-type]  # file-like: write, flush
            except Exception:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_error(run_dir: Path, file: Path, err: OSError) -> CheckpointWriteError:
    name = errno.errorcode.get(err.errno, f"errno {err.errno}") if err.errno else "I/O error"
    previous = latest(run_dir)
    kept = (
        f"the last checkpoint, {previous.name}, is intact"
        if previous is not None
        else "there is no earlier checkpoint"
    )
    return CheckpointWriteError(
        f"cannot write checkpoint {str(file)!r}: {name} ({err.strerror or err}); the partial file "
        f"was removed and {kept}; free some space (or fix the disk), then continue with --resume"
    )


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
    """Write this process's checkpoint of `step`; with world_size > 1 every rank must call it.
    CheckpointWriteError (one line: the errno, e.g. ENOSPC, and the file) if the disk refuses."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    file = folder / f"step-{step:08d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if world_size == 1:
            path = file
            _atomic_save(state, path)
        else:
            path = folder / f"step-{step:08d}"
            path.mkdir(exist_ok=True)
            file = path / _rank_file(rank, world_size)
            _atomic_save(state, file)
    except OSError as err:
        raise _write_error(Path(run_dir), file, err) from None
    if world_size > 1:
        if rank == 0:  # files of a run with another process count that was killed at this step
            for stale in path.glob("rank-*-of-*"):  # (.tmp files of this run's ranks stay)
                if stale.name.split("-of-")[1][:5] != f"{world_size:05d}":
                    stale.unlink(missing_ok=True)
        barrier()  # every shard is on disk before the folder is named
    if rank == 0:
        latest_tmp = folder / (LATEST + ".tmp")
        try:
            latest_tmp.write_text(path.name + "\n")
            os.replace(latest_tmp, folder / LATEST)
        except OSError as err:
            latest_tmp.unlink(missing_ok=True)
            raise _write_error(Path(run_dir), folder / LATEST, err) from None
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


def _named(folder: Path) -> Path | None:
    """The checkpoint latest.txt names, if it names a complete one (a damaged latest.txt is
    ignored)."""
    try:
        name = (folder / LATEST).read_bytes().decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not _NAME.fullmatch(name):
        return None
    path = folder / name
    return path if path.exists() and _is_complete(path) else None


def candidates(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints a resume may start from, best first: the one latest.txt names, then
    the older ones, newest first. Without latest.txt (killed between writing a checkpoint and
    naming it) the newest complete one comes first (a partial file still has its .tmp name; a
    partial folder lacks some rank's file). Whether their files are intact is `verify`'s part."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = _complete(folder)
    named = _named(folder)
    if named is None:
        return found[::-1]
    older = [p for p in found if _step_of(p) < _step_of(named)]
    return [named, *older[::-1]]


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a file, or a folder of rank files), or None."""
    found = candidates(run_dir)
    return found[0] if found else None


def world_size_of(path: str | Path) -> int:
    """How many processes wrote a checkpoint (1 for a single file)."""
    world_size = _complete_world_size(Path(path))
    if world_size is None:
        raise ValueError(
            f"checkpoint {str(path)!r} is incomplete (a process did not write its file)"
        )
    return world_size


def verify(file: str | Path) -> None:
    """Raise DamagedCheckpoint unless `file` is whole: a zip archive (torch.save's format) whose
    central directory is there (a truncated file has lost it) and whose every record matches the
    CRC-32 stored with it. Reads the file once."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise DamagedCheckpoint(file, f"cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise DamagedCheckpoint(file, "is empty (0 bytes)")
    if head != _ZIP_MAGIC:
        raise DamagedCheckpoint(
            file, f"is not a checkpoint ({size:,} bytes that torch.save did not write)"
        )
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        raise DamagedCheckpoint(
            file, f"is truncated or its index is damaged ({size:,} bytes, no readable end record)"
        ) from None
    try:
        with archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as err:
        raise DamagedCheckpoint(file, f"is damaged ({size:,} bytes; {_first_line(err)})") from None
    if bad is not None:
        raise DamagedCheckpoint(
            file, f"fails the CRC check of its record {bad!r} (its contents changed after saving)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    rank: int = 0,
    world_size: int = 1,
    mmap: bool = False,
) -> dict:
    """One process's file of a checkpoint (`rank` of `world_size`), verified first; ValueError if
    the checkpoint was written by another number of processes (the trainer then reads every file
    and reshards, moe_impl.parallel.shard_state), DamagedCheckpoint if the file is damaged."""
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
    verify(path)
    # mmap: tensors are read from the file as they are used (a rank reading rank 0's file for the
    # replicated layers does not hold all of it in memory)
    try:
        return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:  # past verify: rare
        raise DamagedCheckpoint(path, f"cannot be unpickled ({_first_line(err)})") from None
