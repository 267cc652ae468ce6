"""The one-GPU reproduction's cost: every run of a workflow config (config/gpu.yaml by default;
config/smoke.yaml at --quick), ten timed training steps of each distinct model at the run's batch,
dtype and optimizer, and the projected wall time of the whole reproduction.

Projection per run = its steps (train.tokens, or epochs of the corpus) x (the measured median step
of the model + the measured time the corpus takes to make one training batch, which the trainer
does on the CPU between steps), plus its evaluations (final and eval.at_tokens snapshots) counted at a third of a training step per
position (forward only). Not counted: starting processes, checkpoints, the benchmark and analysis
jobs; read the total as a lower bound of a sequential run on this one device.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import yaml

from moe_impl.gpucheck import ROOT
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.speed import time_lm_step
from moe_impl.gpucheck.timing import is_oom
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.runs.sweeps import planned_runs
from moe_impl.train.config import load_config, model_config
from moe_impl.train.corpus import build_corpus
from moe_impl.train.schedule import total_steps


def _corpus(cfg):
    """The run's corpus (its vocabulary and epoch length), or None where its data is missing."""
    try:
        return build_corpus(cfg)
    except (ValueError, OSError):
        return None


def batch_seconds(corpus, batch_size: int, seq_len: int, reps: int) -> float:
    """Median seconds the corpus takes to make one training batch (the trainer's CPU work)."""
    times = []
    for step in range(reps + 1):
        start = time.perf_counter()
        corpus.train_batch(step, batch_size, seq_len)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def project_workflow(device: torch.device, sizes: Sizes, config_path: str | None = None) -> dict:
    path = ROOT / (config_path or sizes.workflow_config)
    config = yaml.safe_load(path.read_text())
    train_config = ROOT / config["train_config"]
    runs = planned_runs(config)
    timed: dict[tuple, dict] = {}
    corpora: dict = {}  # one per data section: the synthetic corpus's table takes ~30 s to build
    batches: dict[tuple, float] = {}
    rows = []
    for planned in runs:
        cfg = load_config([train_config], planned.overrides)
        if cfg.data not in corpora:
            corpora[cfg.data] = _corpus(cfg)
        corpus = corpora[cfg.data]
        vocab = corpus.vocab_size if corpus is not None else ALL_PRESETS[planned.preset].vocab_size
        model = model_config(cfg, vocab_size=vocab)
        train = cfg.train
        key = (model, train.batch_size, train.seq_len, train.dtype, train.expert_optimizer,
               cfg.model.sparse_grad)  # fmt: skip
        row = {"sweep": planned.sweep, "run": planned.run, "model": model.name,
               "tokens_per_step": train.tokens_per_step}  # fmt: skip
        if key not in timed:
            try:
                timed[key] = time_lm_step(
                    model, train, device, batch=train.batch_size, seq_len=train.seq_len,
                    warmup=sizes.workflow_warmup, reps=sizes.workflow_steps,
                    dropout=cfg.model.dropout,
                )  # fmt: skip
            except Exception as err:
                if not is_oom(err):
                    raise
                timed[key] = {"status": "out of memory"}
        measured = timed[key]
        if "median_s" not in measured:
            rows.append({**row, "status": measured["status"]})
            continue
        if train.tokens is None and corpus is None:
            rows.append({**row, "status": "epochs of a corpus that is not here: not projected"})
            continue
        steps = total_steps(train, corpus)
        shape = (cfg.data, train.batch_size, train.seq_len)
        if shape not in batches:
            batches[shape] = batch_seconds(corpus, *shape[1:], sizes.workflow_steps)
        evals = 1 + len(cfg.eval.at_tokens)
        eval_positions = (cfg.eval.tokens or 0) * evals
        step_s = measured["median_s"]
        batch_s = batches[shape]
        hours = (
            steps * (step_s + batch_s) + eval_positions / train.tokens_per_step / 3 * step_s
        ) / 3600
        rows.append({**row, "steps": steps, "step_ms": 1e3 * step_s, "batch_ms": 1e3 * batch_s,
                     "peak_gib": measured.get("peak_gib"), "projected_hours": hours})  # fmt: skip
    projected = [r["projected_hours"] for r in rows if "projected_hours" in r]
    unprojected = [f"{r['sweep']}/{r['run']}" for r in rows if "projected_hours" not in r]
    return {
        "config": str(path.relative_to(ROOT)),
        "runs": len(runs),
        "distinct_models_timed": len(timed),
        "projected_total_hours": math.fsum(projected),
        "not_projected": ", ".join(unprojected) or None,
        "rows": rows,
    }
