"""The one-GPU reproduction's cost: every run of a workflow config (config/gpu.yaml by default;
config/smoke.yaml at --quick), ten timed training steps of each distinct model at the run's batch,
micro-batches, dtype and optimizer, the training input's rate, and the projected wall time of the
whole reproduction.

Projection per run (moe_impl/runs/resources.py's rules, the ones `python -m moe_impl plan` applies
to the measurements in workflow/resources/step_times.yaml): its steps x the measured step (all its
micro-batches), where the input (the corpus making one batch, timed in this process, shared by
train.prefetch_workers processes) counts only beyond the step when made ahead and whole when made
inline, plus its evaluations at a third of a training step per position. Not counted: starting
processes, checkpoints, the benchmark and analysis jobs. The measured steps are also written as
`step_times.yaml` beside the report, in workflow/resources/step_times.yaml's layout: copy its
entries there and `plan` projects from them.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from moe_impl.gpucheck import ROOT
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.speed import time_lm_step
from moe_impl.gpucheck.timing import is_oom
from moe_impl.model.flops import total_params
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.runs import resources
from moe_impl.runs.sweeps import planned_runs
from moe_impl.train.config import load_config, model_config
from moe_impl.train.corpus import build_corpus
from moe_impl.train.device import device_name
from moe_impl.train.plan import eval_positions, prefetch_workers
from moe_impl.train.schedule import total_steps


def _corpus(cfg):
    """The run's corpus (its vocabulary and epoch length), or None where its data is missing."""
    try:
        return build_corpus(cfg)
    except (ValueError, OSError):
        return None


def batch_seconds(corpus, batch_size: int, seq_len: int, reps: int) -> float:
    """Median seconds the corpus takes to make one training batch in one process (the trainer's
    input path; its producer runs train.prefetch_workers such processes)."""
    times = []
    for step in range(reps + 1):
        start = time.perf_counter()
        corpus.train_batch(step, batch_size, seq_len)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def project_workflow(
    device: torch.device, sizes: Sizes, config_path: str | None = None, out_dir: Path | None = None
) -> dict:
    path = ROOT / (config_path or sizes.workflow_config)
    config = yaml.safe_load(path.read_text())
    train_config = ROOT / config["train_config"]
    runs = planned_runs(config)
    timed: dict[tuple, dict] = {}
    corpora: dict = {}  # one per data section (its successor table is cached on disk)
    batches: dict[tuple, float] = {}
    measured_models: dict[str, dict] = {}
    rows = []
    for planned in runs:
        cfg = load_config([train_config], planned.overrides)
        if cfg.data not in corpora:
            corpora[cfg.data] = _corpus(cfg)
        corpus = corpora[cfg.data]
        vocab = corpus.vocab_size if corpus is not None else ALL_PRESETS[planned.preset].vocab_size
        model = model_config(cfg, vocab_size=vocab)
        train = cfg.train
        # the model holds its gate options; a compiled run is timed compiled
        key = (model, cfg.model.compile, *_step_shape(train))
        row = {
            "sweep": planned.sweep,
            "run": planned.run,
            "model": model.name,
            "tokens_per_step": train.tokens_per_step,
            "micro_batches": train.micro_batches,
        }
        if key not in timed:
            timed[key] = _time_model(model, cfg, device, sizes)
        measured = timed[key]
        if "median_s" not in measured:
            rows.append({**row, "status": measured["status"]})
            continue
        if train.tokens is None and corpus is None:
            rows.append({**row, "status": "epochs of a corpus that is not here: not projected"})
            continue
        entry = {
            "params": total_params(model),
            "step_ms": round(1e3 * measured["median_s"], 2),
            "peak_gib": None
            if measured.get("peak_gib") is None
            else round(measured["peak_gib"], 3),
            "tokens_per_step": train.tokens_per_step,
            "micro_batches": train.micro_batches,
        }
        measured_models.setdefault(planned.preset, entry)
        rows.append({**row, **_projection(cfg, corpus, entry, measured, batches, sizes)})
    projected = [r["projected_hours"] for r in rows if "projected_hours" in r]
    unprojected = [f"{r['sweep']}/{r['run']}" for r in rows if "projected_hours" not in r]
    result = {
        "config": str(path.relative_to(ROOT)),
        "runs": len(runs),
        "distinct_models_timed": len(timed),
        "projected_total_hours": math.fsum(projected),
        "not_projected": ", ".join(unprojected) or None,
        "rows": rows,
    }
    if out_dir is not None and measured_models:
        result["step_times"] = str(_write_step_times(out_dir, device, measured_models, batches))
    return result


def _step_shape(train) -> tuple:
    """What a step's time depends on beside the model: its batch, precision and optimizer."""
    return (
        train.batch_size,
        train.seq_len,
        train.dtype,
        train.expert_optimizer,
        train.micro_batches,
    )


def _projection(cfg, corpus, entry: dict, measured: dict, batches: dict, sizes: Sizes) -> dict:
    """A run's projected steps, input wait and hours from its model's measured step and the
    input path's measured batch time (`batches`, filled here per batch shape)."""
    train = cfg.train
    steps = total_steps(train, corpus)
    shape = (cfg.data, train.batch_size // train.micro_batches, train.seq_len)
    if shape not in batches:  # one micro-batch's worth: the producer's unit of work
        batches[shape] = batch_seconds(corpus, *shape[1:], sizes.workflow_steps)
    workers = prefetch_workers(cfg)
    input_rate = shape[1] * shape[2] / batches[shape]
    step = resources.step_seconds(
        {**entry, "source": "this check"},
        tokens_per_step=train.tokens_per_step,
        input_tokens_per_s=input_rate * max(workers, 1),
        prefetch=workers > 0,
    )
    assert step is not None  # a measured step is given
    evaluated = eval_positions(cfg, steps)
    wait = max(step.value - measured["median_s"], 0.0)
    return {
        "steps": steps,
        "step_ms": entry["step_ms"],
        "batch_ms": 1e3 * batches[shape] * train.micro_batches,
        "prefetch_workers": workers,
        "input_wait_fraction": wait / step.value if step.value else 0.0,
        "peak_gib": entry["peak_gib"],
        "projected_hours": resources.run_hours(steps, step.value, evaluated, train.tokens_per_step),
    }


def _time_model(model, cfg, device: torch.device, sizes: Sizes) -> dict:
    """The timed step of one distinct model at the run's batch, or {"status": "out of memory"}."""
    train = cfg.train
    try:
        return time_lm_step(
            model,
            train,
            device,
            batch=train.batch_size,
            seq_len=train.seq_len,
            warmup=sizes.workflow_warmup,
            reps=sizes.workflow_steps,
            micro_batches=train.micro_batches,
            compile_sizes=sizes if cfg.model.compile else None,
        )
    except Exception as err:
        if not is_oom(err):
            raise
        return {"status": "out of memory"}


def _write_step_times(out_dir: Path, device: torch.device, models: dict, batches: dict) -> Path:
    """The measured steps in workflow/resources/step_times.yaml's layout (`models`, and the
    input's `ms_per_batch`: the trainer's own input path, so no `speedup`), for a person to copy
    there."""
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    source = f"gpu-check, {when}"
    (_, rows, seq), seconds = max(batches.items(), key=lambda item: item[0][1] * item[0][2])
    doc = {
        device.type: {
            "device": device_name(device),
            "input": {  # the trainer's input path, one process, the largest batch timed
                "ms_per_batch": round(1e3 * seconds, 2),
                "tokens_per_batch": rows * seq,
                "source": source,
            },
            "models": {name: {**entry, "source": source} for name, entry in models.items()},
        }
    }
    path = Path(out_dir) / "step_times.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
