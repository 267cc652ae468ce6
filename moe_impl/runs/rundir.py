"""The run directory: the files a training or benchmark job writes, the source of truth downstream.

    RUN_DIR/
      config.yaml        the fully resolved config (every default filled in), written at start
      metrics.jsonl      one JSON object per line, appended and flushed as the run goes:
                           {"kind": "train", "step", "tokens", "loss", "aux_loss", "lr",
                            "grad_norm", "tokens_per_second", "cv_importance", "cv_load",
                            "max_over_mean_load", "num_dropped", "time"}
                           {"kind": "eval", "step", "tokens", "split", "nll", "perplexity",
                            "excess_nll" (or null), "scored_tokens", "time"}
      expert_load.json   MoE runs: {"steps": n, "tokens_per_expert": [...]}, the true load (slots
                           routed to each expert) summed over the last n training steps
      summary.json       written once, at the end of a finished run (its presence = finished):
                           see SUMMARY_KEYS
      checkpoints/       step-NNNNNNNN.pt, the newest few kept; latest.txt names the newest
      run.json           identity: {"run_id" (uuid4 hex, stable across resumes), "name",
                            "experiment", "started", "host", "git_commit", "git_dirty", "card"
                            (the MLflow run name, description and dataset: train/card.py)}
      .lock              flock-ed by the process training into the directory (runs/lock.py)

Every number is a plain JSON number; NaN and infinities are written as null (JSON has none).
Writers append and fsync nothing but flush every line, so a killed run leaves every line it logged;
a partly written last line (killed mid-write) is skipped by `read_metrics`.
"""

from __future__ import annotations

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
    "tokens_per_second",  # training positions per second, excluding evaluation time
    "cv_importance",  # mean over the last logged steps
    "cv_load",
    "max_over_mean_load",
    "peak_memory_mb",
    "wall_time_s",
    "train_tokens",  # training positions processed (batch · seq_len · steps)
    "train_scored_tokens",
    "steps",
    "model",  # the resolved ModelConfig as a dict (dataclasses.asdict; lstm_layers as lists)
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


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(dumps(record) + "\n")
        f.flush()


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


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


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
