"""What the workflow checks and does before any of its jobs runs (its `onstart` hook,
workflow/rules/train.smk: never in a dry run, which plans any config on any machine), as messages
for the hook to log:

- CUDA: jobs about to run here that need a CUDA device stop the workflow, nothing started, when
  the jobs' `python` sees none (`Refused`); when it sees one, a warning if nothing limits how many
  jobs share the GPUs. The device is probed through that `python` in a subprocess, so that parsing
  the workflow never imports torch.
- memory: a job whose estimate is more than the budget runs alone (Snakemake lowers its mem_mb to
  the budget) and may be killed; a budget above this machine's free memory lets jobs started
  together be killed (warnings).
- changed runs: a run directory whose saved config has other values is set aside whole
  (moe_impl/train/identity.py) before Snakemake removes its summary.json; its job starts anew.

Each check takes the jobs about to run as `(rule, run)` pairs, `run` the runtable.Run of a train
job, else None. Torch-free: the workflow imports it while parsing."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from moe_impl.train.config import RunConfig
from moe_impl.train.identity import changes, describe, set_aside
from moe_impl.train.runtable import Run

Job = tuple[str, Run | None]  # a job about to run: its rule, and its run if it trains one
CUDA_PROBE = "import torch; print(torch.cuda.is_available(), torch.__version__)"


class Refused(Exception):
    """The workflow must stop before any job starts; the message says why and what to do."""


def cuda_missing(python: str | None = None) -> str | None:
    """Why the jobs' `python` (the first on PATH) cannot use CUDA ("torch 2.13.0+cpu sees none"),
    or None when it can, or when that cannot be told here (no python or no torch on PATH, e.g.
    with per-rule conda environments: each job then stops with its own one-line error)."""
    python = python or shutil.which("python") or sys.executable
    try:
        proc = subprocess.run(
            [python, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = proc.stdout.split()
    if proc.returncode != 0 or len(words) < 2 or words[-2] == "True":
        return None
    return f"torch {words[-1]} sees none"


def config_names(files: Sequence[str | Path]) -> str:
    """The workflow config as the user named it: the --configfile paths, else the default."""
    if not files:
        return "config/config.yaml"
    return ", ".join(os.path.relpath(f) for f in files)


def needs_cuda(job: Job, bench_device: str) -> bool:
    """Training runs with train.device cuda (or cuda:N), the benchmark with bench.device cuda."""
    rule, run = job
    if run is not None:
        return run.needs_cuda
    return rule == "bench" and bench_device == "cuda"


def check_cuda(
    jobs: Sequence[Job],
    bench_device: str,
    gpu_limited: bool,
    configs: str,
    python: str | None = None,
) -> list[str]:
    """The warnings about the jobs about to run here that need CUDA (`bench_device`: the config's
    bench.device); Refused when this machine has no CUDA device for them. `gpu_limited`: a
    --resources gpu=N limits how many run at once; `configs`: the workflow config's name
    (config_names); `python`: the jobs' (cuda_missing)."""
    rules = [job[0] for job in jobs if needs_cuda(job, bench_device)]
    if not rules:
        return []
    why = cuda_missing(python)
    if why is None:
        if len(rules) > 1 and not gpu_limited:
            return [
                f"{len(rules)} jobs ask for GPUs (resources: gpu) but no --resources gpu=N "
                "limits how many run at once, so several may share a GPU: pass --resources "
                "gpu=<this machine's GPUs> (gpu=1 for one)."
            ]
        return []
    key = "train.device" if "train" in rules else "bench.device"
    raise Refused(
        f"{configs} trains on cuda ({key}=cuda) but this machine has no CUDA device "
        f"({why}); no job was started. Run it where a GPU and a CUDA build of PyTorch are, "
        "or plan it here with `snakemake -n`."
    )


def machine_free_mb(script: Path) -> int | None:
    """This machine's memory budget now (MB) by workflow/scripts/mem_budget.py (`script`, which
    runs before anything is installed), or None where it cannot be read."""
    try:
        return runpy.run_path(str(script))["machine_budget_mb"]()
    except (OSError, ValueError, ImportError):
        return None


def job_mem_mb(job: Job, bench_mem_mb: int) -> int:
    """A job's own estimate: Snakemake lowers a job's mem_mb to the budget when it is more (so
    that such a job still runs, alone), which hides it from the job's resources."""
    rule, run = job
    if run is not None:
        return run.mem_mb
    return bench_mem_mb if rule == "bench" else 0


def check_memory(
    jobs: Sequence[Job], *, bench_mem_mb: int, budget: int, free: int | None, script: Path
) -> list[str]:
    """The warnings about the jobs about to run against the budget (`--resources mem_mb=`), and
    about the budget against `free`, this machine's free memory (machine_free_mb of `script`;
    None: not checked)."""
    warnings = []
    names = ("/".join(run.key) if run else rule for rule, run in jobs)
    estimates = zip(names, (job_mem_mb(job, bench_mem_mb) for job in jobs), strict=True)
    over = sorted(f"{name} ({mb} MB)" for name, mb in estimates if mb > budget)
    if over:
        warnings.append(
            f"{', '.join(over)}: more memory than the budget, --resources mem_mb={budget}. "
            "Each will run alone, and may be killed if the machine has less free then; the "
            "estimates are measured peaks with a margin (workflow/resources/peak_memory.yaml). "
            "Leave such runs out of the config (sweeps_to_run, a sweep's models, bench.experts) "
            "or run where more memory is free."
        )
    if free is not None and budget > free:
        warnings.append(
            f"The memory budget mem_mb={budget} is more than this machine has free now "
            f"({free} MB after a reserve): jobs started together may be killed. `make "
            f"reproduce` sets it from free memory, or pass --resources mem_mb=$(python {script})."
        )
    return warnings


def set_aside_changed(directory: str | Path, cfg: RunConfig) -> str | None:
    """When the run directory holds a config with other values than `cfg` (or one that cannot be
    read), renames it to a hidden sibling `.<run>.replaced-<UTC time>`, whole, and says so; else
    None. `train --replace-changed` does the same where the hook did not run (--no-hooks)."""
    try:
        diffs = changes(directory, cfg)
        why = describe(diffs) if diffs else None
    except ValueError as err:  # an unreadable config.yaml
        why = str(err)
    if not why:
        return None
    moved = set_aside(directory)
    return f"{directory}: config changed ({why}); moved the old run to {moved}"


def set_aside_changed_runs(jobs: Sequence[Job], runs_dir: str) -> Iterator[str]:
    """set_aside_changed for the run directory `<runs_dir>/<sweep>/<run>` of each train job about
    to run, in turn: what it set aside."""
    for _, run in jobs:
        if run is not None:
            moved = set_aside_changed(f"{runs_dir}/{run.sweep}/{run.run}", run.config)
            if moved:
                yield moved
