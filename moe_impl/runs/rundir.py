"""The run directory: the files a training or benchmark job writes, the source of truth downstream.

    RUN_DIR/
      config.yaml        the fully resolved config (every default filled in), written at start
      metrics.jsonl      one JSON object per line, appended and flushed as the run goes:
                           {"kind": "train", "step", "tokens", "loss", "aux_loss", "lr",
                            "grad_norm", "tokens_per_second", "input_wait_s",
                            "cv_importance", "cv_load", "max_over_mean_load", "num_dropped",
                            "time"}; input_wait_s: the seconds the step waited for its batch
                            (train/prefetch.py), included in its tokens_per_second; MoE runs
                            add "max_violation", "dead_expert_fraction", "top20_load_share",
                            "gate_entropy" (hierarchical runs: also GROUP_METRICS) at every
                            train.log_every step and the last (runs/expertstats.py)
                           {"kind": "eval", "step", "tokens", "split", "nll", "perplexity",
                            "excess_nll" (or null), "scored_tokens", "time"}
      expert_load.json   MoE runs: {"steps": n, "tokens_per_expert": [...]}, the true load (slots
                           routed to each expert) summed over the last n training steps
      expert_stats/      MoE runs: per-expert load and Importance over training, a row of
                           quantiles per record and full vectors at 8 records (runs/expertstats.py
                           gives the layout; read_expert_stats reads it, numpy only)
      summary.json       written once, at the end of a finished run (its presence = finished):
                           see SUMMARY_KEYS; `diverged` is null, or the reason (one line) when
                           an evaluation's perplexity was not finite (test_perplexity then null;
                           analysis collect leaves such runs out)
      checkpoints/       step-NNNNNNNN.pt, the newest few kept; latest.txt names the newest
      run.json           identity: {"run_id" (uuid4 hex, stable across resumes), "name",
                            "experiment", "started", "host", "git_commit", "git_dirty", "card"
                            (the MLflow run name, description and dataset: train/card.py)}
      .lock              flock-ed by the process training into the directory (runs/lock.py)

Every number is a plain JSON number; NaN and infinities are written as null (JSON has none).
Writers append and fsync nothing but write every line through, so a killed run leaves every line it
logged; a partly written last line (killed mid-write) is skipped by `read_metrics`. The other files
are replaced whole through a temporary file (`write_text`, `write_json`). A write the disk refuses
(ENOSPC: full; EDQUOT: over quota) leaves what was there before: an append is cut back to the last
whole line, a replacement's temporary file is removed; it raises `RunDirWriteError`, one line
naming the file, which the CLI prints (exit 2), as it does for a checkpoint (train/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EXPERT_LOAD_FILE = "expert_load.json"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
# a run directory set aside for a changed config (train/identity.py, set_aside): D ->
# D.parent / ".{D.name}.replaced-<UTC time>", whole
ASIDE_MARK = ".replaced-"

# summary.json: these keys are always present (value null where not applicable); the tracking
# module logs each numeric one as a final MLflow metric of the same name.
SUMMARY_KEYS = (
    "test_perplexity",  # exp(test_nll)
    "test_nll",  # mean nats per scored test token (words incl. </S>)
    "excess_nll",  # test_nll − the oracle's NLL on the same tokens (synthetic corpus only)
    "floor_nll",  # closed-form Bayes-optimal NLL (synthetic corpus only)
    "params_total",
    "params_excl_embedding_softmax",
    "ops_per_timestep",
    "train_flops_per_token",
    "tflops_per_device",  # train_flops_per_token · tokens per second / devices / 1e12
    "mfu",  # tflops_per_device / the device's peak (null where the peak is unknown)
    "tokens_per_second",  # training positions per second, excluding evaluation time (the wait
    # for the batches included)
    "input_wait_fraction",  # the share of the training time spent waiting for batches
    "cv_importance",  # mean over the last logged steps
    "cv_load",
    "max_over_mean_load",
    # the last expert-statistics record's (runs/expertstats.py; null for dense runs)
    "max_violation",  # MaxVio = max load / mean load − 1 over the record's steps
    "dead_expert_fraction",  # experts with no token in the last train.dead_expert_window steps
    "top20_load_share",  # the share of slots on the busiest 20% of experts
    "gate_entropy",  # mean gate entropy in nats over the record's tokens (at most ln k)
    # hierarchical runs only (null otherwise): the same for the groups, and each level's entropy
    "group_max_violation",
    "group_dead_fraction",
    "group_top20_load_share",
    "primary_gate_entropy",  # per token, over the k_primary groups
    "secondary_gate_entropy",  # per (token, group) pair, over the k_secondary experts
    "peak_memory_mb",
    "wall_time_s",
    "train_tokens",  # training positions processed (batch · seq_len · steps)
    "train_scored_tokens",
    "steps",
    "model",  # the resolved ModelConfig as a dict (ModelConfig.flat(); lstm_layers as lists)
)


def _clean(value):
    """NaN / inf -> None, recursively, so the files stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def dumps(record: dict) -> str:
    return json.dumps(_clean(record), sort_keys=False, allow_nan=False)


class RunDirWriteError(ValueError):
    """A run directory file the disk refused (full, over quota, failing): one line naming the file
    and the errno; what the file held before is intact, so `--resume` continues once there is
    space."""


# what a full disk is in words; any other errno is said in its own words
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}


def _write_error(path: Path, err: OSError, kept: str) -> RunDirWriteError:
    name = errno.errorcode.get(err.errno, f"errno {err.errno}") if err.errno else "I/O error"
    what, todo = f"{name} ({err.strerror or err})", "fix that"
    if err.errno in _FULL:
        what, todo = f"{what}, {_FULL[err.errno]}", "free some space"
    return RunDirWriteError(
        f"cannot write {str(path)!r}: {what}; {kept}; {todo}, then continue with --resume"
    )


def _write_all(f, data: bytes) -> None:
    """Write every byte to an unbuffered file (a write may take only some: a disk filling up)."""
    while data:
        written = f.write(data)
        if not written:  # (a file on a disk never takes nothing; no endless loop if one did)
            raise OSError(errno.EIO, "the file took none of the bytes written")
        data = data[written:]


def _cut_back(f, size: int) -> None:
    """Truncate `f` to `size` (what it held before a failed write; needs no space). Where that is
    impossible (a device) the partial line stays, and read_metrics skips it."""
    with contextlib.suppress(OSError):
        f.truncate(size)


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append `record` as one line; RunDirWriteError (the partial line cut off) if the disk refuses."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "ab", buffering=0) as f:  # unbuffered: each line is written through
            start = f.seek(0, os.SEEK_END)
            try:
                _write_all(f, (dumps(record) + "\n").encode())
            except OSError:
                _cut_back(f, start)
                raise
    except OSError as err:
        kept = "the record was not written, every earlier one is intact"
        raise _write_error(path, err, kept) from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every complete line of metrics.jsonl; a truncated last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_text(path: str | Path, text: str, *, per_process: bool = False) -> None:
    """Replace `path` whole, through `path.tmp` (`path.<pid>.tmp` with `per_process`, for a file
    every process of a run may write at once): a reader never sees half a file. If the disk
    refuses, the temporary file is removed, `path` is as it was and RunDirWriteError is raised."""
    path = Path(path)
    tmp = path.with_name(path.name + (f".{os.getpid()}.tmp" if per_process else ".tmp"))
    try:
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, text.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"{path.name} is as it was" if path.exists() else f"{path.name} was not written"
        raise _write_error(path, err, kept) from None


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write (`write_text`): a reader never sees half a file."""
    write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def set_aside_copies(run_dir: str | Path) -> list[Path]:
    """The earlier run directories set aside in place of run_dir (ASIDE_MARK), oldest first."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.parent.glob(f".{run_dir.name}{ASIDE_MARK}*") if p.is_dir())


def read_summary(run_dir: str | Path) -> dict | None:
    """The finished run's summary, or None while it is unfinished."""
    path = Path(run_dir) / SUMMARY_FILE
    return read_json(path) if path.exists() else None


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).exists()
