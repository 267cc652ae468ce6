"""Who and where a run is: git state, host, versions, device name, and the run identity file.

The helpers a training job needs to fill `run.json` (rundir.py) without importing MLflow; the
tracking module reads the same facts for its tags, and the MLflow-free mapping of run files to
params and metric names below. Nothing here raises because git, torch or /proc are missing:
unknown facts become "unknown" (git) or a generic name (device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import platform
import re
import socket
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

from moe_impl.runs import rundir

GIT_TIMEOUT_S = 5.0
CARD_KEY = "card"  # run.json: {"display_name", "description", "dataset"} (moe_impl/train/card.py)
_REPO_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path) -> str | None:
    """stdout of `git ARGS` in cwd, or None where git is missing, slow or fails."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_info(repo_dir: str | Path | None = None) -> dict:
    """{"git_commit": full hash or "unknown", "git_dirty": bool or None (unknown)}.

    repo_dir defaults to the checkout this package was imported from (not the cwd), so runs
    launched from elsewhere still record the code they ran.
    """
    cwd = Path(repo_dir) if repo_dir is not None else _REPO_DIR
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": None}
    # NOTE: untracked files count as dirty too: an uncommitted new module changes what ran.
    status = _git("status", "--porcelain", cwd=cwd)
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status)}


def host() -> str:
    return socket.gethostname()


def package_version(name: str) -> str:
    """Installed version of a distribution ("torch", "mlflow"), without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """Versions worth a tag: python, torch, mlflow, nvidia-ml-py."""
    return {
        "python_version": platform.python_version(),
        "torch_version": package_version("torch"),
        "mlflow_version": package_version("mlflow"),
        "nvidia_ml_py_version": package_version("nvidia-ml-py"),
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor(), else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: str | None = None) -> str:
    """Name of the device a run computes on: the CUDA device's name, or the CPU model.

    device: "cuda", "cuda:1", "cpu" or None (CUDA device 0 when available, else the CPU).
    torch is imported here only when the device may be CUDA.
    """
    if device is not None and not str(device).startswith("cuda"):
        return cpu_name()
    try:
        import torch

        if torch.cuda.is_available():
            index = int(str(device).split(":")[1]) if device and ":" in str(device) else None
            return torch.cuda.get_device_name(index)
    except (ImportError, RuntimeError, ValueError):
        pass
    return cpu_name()


def new_run_identity(name: str, experiment: str) -> dict:
    """The contents of a new run.json (rundir.py), with the versions the run used."""
    return {
        "run_id": uuid.uuid4().hex,
        "name": name,
        "experiment": experiment,
        "started": time.time(),  # seconds since the epoch
        "host": host(),
        **git_info(),
        "torch_version": package_version("torch"),
        "python_version": platform.python_version(),
    }


def write_run_identity(
    run_dir: str | Path, name: str, experiment: str, card: dict | None = None
) -> dict:
    """Create run_dir/run.json once and return the identity; a resumed run gets the old one.

    Idempotent: an existing run.json keeps its identity, so `run_id` is stable across resumes
    and is the key that keeps MLflow from duplicating a run (moe_impl.tracking). `card` (what the
    run is, in words: moe_impl/train/card.py) is stored under "card", and replaced when it differs
    (a run resumed by newer code gets the newer card).
    """
    path = Path(run_dir) / rundir.RUN_FILE
    if path.exists():
        identity = rundir.read_json(path)
        if card is not None and identity.get(CARD_KEY) != card:
            identity = {**identity, CARD_KEY: card}
            rundir.write_json(path, identity)
        return identity
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = new_run_identity(name, experiment)
    if card is not None:
        identity[CARD_KEY] = card
    rundir.write_json(path, identity)
    return identity


def display_name(name: str, sweep: str | None = None, seed: int = 0) -> str:
    """The run's name in MLflow, unique within a workflow config: `lm1b/MoE-32`, `lm1b/MoE-32/seed1`,
    `balance/MoE-256_wi0.1_wl0.1`. The sweep comes first, a seed other than 0 last; the
    `_seed<S>` suffix the workflow gives a run directory (moe_impl/runs/sweeps.py) is taken off
    `name` so that the seed is not said twice."""
    suffix = f"_seed{seed}"
    if seed and name.endswith(suffix) and len(name) > len(suffix):
        name = name[: -len(suffix)]
    parts = [sweep] if sweep else []
    parts.append(name)
    if seed:
        parts.append(f"seed{seed}")
    return "/".join(parts)


def config_tags(config: dict) -> dict[str, str]:
    """The MLflow tags a training run takes from its config (config.yaml's mapping): preset,
    corpus and sweep ("" outside a sweep), the last the runs page's grouping
    (moe_impl/tracking/view.py). The live tracker and the importer share them."""
    model, data = config.get("model"), config.get("data")
    model = model if isinstance(model, dict) else {}
    data = data if isinstance(data, dict) else {}
    tags = {"preset": model.get("preset"), "corpus": data.get("corpus")}
    tags["sweep"] = config.get("sweep") or ""
    return {k: str(v) for k, v in tags.items() if v is not None}


# --- the run directory as tracking sees it (names shared by live logging and import) ----------

MAX_PARAM_VALUE, MAX_KEY = 6000, 250  # MLflow's limits (mlflow.utils.validation)
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow keys: alphanumerics, _ - . / : space


def metric_key(key: str) -> str:
    """A valid MLflow param/metric key: odd characters -> "_", at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def number(value) -> float | None:
    """A finite float, or None for None, NaN, inf, bools, strings and non-numbers."""
    if value is None or isinstance(value, bool | str | bytes):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def flatten(nested, prefix: str = "", *, as_text: bool = True) -> dict:
    """{"model": {"num_experts": 4}} or a dataclass -> {"model.num_experts": 4}.

    Non-empty dicts become dotted keys; lists, tuples and empty dicts become JSON text (kept as
    they are with `as_text=False`, for comparing values); any other value is kept as it is. The one
    flattener: MLflow params (flatten_config), analysis's summary columns (analysis/collect.py)
    and a run's identity (train/identity.py) use it.
    """
    if dataclasses.is_dataclass(nested) and not isinstance(nested, type):
        nested = dataclasses.asdict(nested)
    out: dict = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + ".", as_text=as_text))
        elif as_text and isinstance(value, list | tuple | dict):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def flatten_config(config, prefix: str = "") -> dict[str, str]:
    """{"model": {"num_experts": 4}} or a dataclass -> {"model.num_experts": "4"} (flatten, every
    value as text); values beyond MLflow's 6000-character limit are cut (config.yaml keeps them
    whole)."""
    out: dict[str, str] = {}
    for name, value in flatten(config, prefix).items():
        text = str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[metric_key(name)] = text
    return out


def tracked_step(step: int, every: int, last: int) -> bool:
    """Whether training step `step` (1-based) goes to MLflow: every `every` (train.log_every)
    steps and the last one. The training loop and the importer share it, so a live and an
    imported run have the same history; metrics.jsonl keeps every step."""
    return step % every == 0 or step == last


def record_metrics(record: dict) -> dict[str, float]:
    """One metrics.jsonl record -> MLflow metrics: train keys as `train/<key>`, eval keys as
    `<split>/<key>` (`valid/perplexity`); the live tracker and the importer share these names."""
    kind = record.get("kind", "train")
    prefix = f"{record['split']}/" if kind == "eval" and record.get("split") else f"{kind}/"
    out = {}
    for key, value in record.items():
        if key not in ("kind", "split", "step", "time") and (v := number(value)) is not None:
            out[metric_key(prefix + key)] = v
    return out


def summary_metrics(summary: dict) -> dict[str, float]:
    """Every numeric SUMMARY_KEYS entry of summary.json, under the same name."""
    return {k: v for k in rundir.SUMMARY_KEYS if (v := number(summary.get(k))) is not None}


def final_metrics(summary: dict) -> dict[str, float]:
    """A finished run's final MLflow metrics, the live tracker's and the importer's: every numeric
    SUMMARY_KEYS entry (summary_metrics), each numeric value of summary.json's "regime" as
    `regime.<key>` (`regime.tokens_per_expert_per_step`, `regime.paper_tokens_per_parameter`),
    and `corpus.unigram_perplexity`."""
    out = summary_metrics(summary)
    regime, corpus = summary.get("regime"), summary.get("corpus")
    nested = {
        "regime": regime if isinstance(regime, dict) else {},
        "corpus": {"unigram_perplexity": corpus.get("unigram_perplexity")}
        if isinstance(corpus, dict)
        else {},
    }
    for key, value in flatten(nested).items():
        if (v := number(value)) is not None:
            out[metric_key(key)] = v
    return out


def run_artifacts(run_dir: str | Path) -> list[Path]:
    """The files a run logs as artifacts: config, summary, metrics, identity, the per-expert
    load, and its plots."""
    run_dir = Path(run_dir)
    files = (
        rundir.CONFIG_FILE,
        rundir.SUMMARY_FILE,
        rundir.METRICS_FILE,
        rundir.RUN_FILE,
        rundir.EXPERT_LOAD_FILE,
    )
    return [run_dir / f for f in files if (run_dir / f).is_file()] + sorted(run_dir.glob("*.png"))


def epoch_ms(value) -> int | None:
    """run.json's "started": epoch seconds or an ISO timestamp -> epoch milliseconds."""
    if (seconds := number(value)) is not None:
        return int(seconds * 1000)
    with contextlib.suppress(TypeError, ValueError):
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    return None
