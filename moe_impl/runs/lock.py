"""One training process per run directory: `RUN_DIR/.lock`, held with flock(2) while a run trains.

Two processes training into one --out would interleave metrics.jsonl and overwrite each other's
checkpoints. The training process therefore holds an exclusive flock on RUN_DIR/.lock from the
moment it prepares the directory until its run ends (or the process dies: the kernel releases a
flock with the process, so a killed run leaves no stale lock, only the file). The file holds the
holder's pid, host and start time, which the refusal names. The file itself stays (removing a lock
file races with the next process opening it); its content describes the last holder.

- `check_run_dir` runs before anything is built (the CLI): --out must not be a file or under one,
  and no other process may hold it;
- `acquire` / `release` are the trainer's (state.prepare_run_dir, Trainer.run); in a distributed
  run only rank 0 holds the lock, every rank probes it first so all refuse alike;
- within one process the lock is re-entrant (a resumed Trainer after a killed one, in tests).

Where flock is missing (Windows) there is no lock. On NFS, Linux maps flock to POSIX byte-range
locks, which work across clients that run lockd.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None  # type: ignore[assignment]  # the module or None; every use checks for None

LOCK_FILE = ".lock"
_ATTEMPTS, _PAUSE_S = 10, 0.05  # another process's probe holds a shared lock for microseconds

_held: dict[Path, int] = {}  # run directory (resolved) -> the descriptor this process locks it by


class RunDirInUse(ValueError):
    """Another process holds the run directory's lock."""


def _key(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve()


def _holding(run_dir: Path) -> bool:
    """Whether this process holds the lock of `run_dir`: of the file now at that path (a run
    directory moved aside took the file this process locked with it)."""
    fd = _held.get(_key(run_dir))
    if fd is None:
        return False
    try:
        now, mine = os.stat(run_dir / LOCK_FILE), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return True
    except OSError:
        pass
    release(run_dir)
    return False


def check_path(run_dir: str | Path) -> None:
    """ValueError (one line) unless `run_dir` can be a run directory: not a file, not under a file,
    and its nearest existing folder writable."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(
            f"--out {str(run_dir)!r} is a file, not a directory: choose a directory for the run"
        )
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"--out {str(run_dir)!r} is under {str(existing)!r}, which is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(run_dir)!r}: {str(existing)!r} is not writable")


def holder(run_dir: str | Path) -> str:
    """Who holds (or last held) the lock, from the lock file: 'pid N on HOST since TIME'."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def _in_use(run_dir: Path) -> RunDirInUse:
    return RunDirInUse(
        f"run directory {str(run_dir)!r} is in use by another training process ({holder(run_dir)});"
        " wait for it to end (or stop it), or choose another --out"
    )


def probe(run_dir: str | Path) -> None:
    """RunDirInUse if another process holds the lock (creates nothing)."""
    run_dir = Path(run_dir)
    if fcntl is None or _holding(run_dir):
        return
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (a new run), or none we could hold either
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_run_dir(run_dir: str | Path) -> None:
    """Before anything is built: `check_path`, then `probe`."""
    check_path(run_dir)
    probe(run_dir)


def acquire(run_dir: str | Path) -> None:
    """Hold the run directory's lock until `release` or the end of the process (creates the
    directory); RunDirInUse if another process holds it."""
    run_dir = Path(run_dir)
    if fcntl is None or _holding(run_dir):
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # children don't inherit
    except OSError as err:
        raise ValueError(
            f"cannot create the lock file {str(run_dir / LOCK_FILE)!r}: {err.strerror or err}"
        ) from None
    for attempt in range(_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == _ATTEMPTS - 1:
                os.close(fd)
                raise _in_use(run_dir) from None
            time.sleep(_PAUSE_S)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, a refusal says "pid unknown"
        pass
    _held[_key(run_dir)] = fd


def release(run_dir: str | Path) -> None:
    """Let the lock go (a no-op where this process does not hold it)."""
    fd = _held.pop(_key(run_dir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_lock_file(path: Path) -> bool:
    """Whether `path` is a run directory's lock file (not a file the run wrote)."""
    return path.name == LOCK_FILE
