"""summary.json of a finished run (its type: moe_impl/runs/runsummary.py, RunSummary, which orders
the fields; rundir.py's SUMMARY_KEYS are always among them): the final evaluation, the corpus (its
describe() and the unigram perplexity of the evaluated tokens, moe_impl/data/unigram.py), the
resolved model and its accounting (moe_impl/model/flops.py), the training regime beside the
paper's (moe_impl/model/regime.py), throughput and MFU, the routing statistics of the last steps,
the balance metrics of the last expert-statistics record (moe_impl/runs/expertstats.py METRICS:
MaxVio, dead experts, the busiest 20%'s share and the mean gate entropy, per level when
hierarchical; null where a run has no value), and where and how the run ran.

A run whose evaluation diverged (its perplexity is not finite: an NLL that is NaN, infinite, or
so large that exp() overflows) still gets a summary.json: `diverged` gives the reason in one line
(null for every other run), test_perplexity is null (inf), and `python -m moe_impl train` exits 3
(moe_impl/train/loop.py, TrainingDiverged)."""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from moe_impl import telemetry
from moe_impl.data.unigram import eval_unigram_perplexity
from moe_impl.model import flops, regime
from moe_impl.model.config import ModelConfig
from moe_impl.runs import expertstats, rundir
from moe_impl.runs.runsummary import UNIGRAM_PERPLEXITY, Regime, RunSummary
from moe_impl.train.config import EvalSection
from moe_impl.train.device import device_name
from moe_impl.train.state import STATS, STATS_WINDOW, LoopState


def perplexity(nll: float) -> float:
    """exp(nll), the perplexity of a mean NLL; inf where exp overflows (a diverged model, NLL over
    ~709.78 nats), NaN for a NaN NLL. Never raises OverflowError."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def model_dict(model: ModelConfig) -> dict:
    """The resolved model as summary.json holds it: its flat form (ModelConfig.flat), lists for
    tuples."""
    out = model.flat()
    out["lstm_layers"] = [list(layer) for layer in model.lstm_layers]
    return out


def corpus_dict(corpus, split: str, evaluation: EvalSection) -> dict:
    """summary.json's "corpus": the corpus's describe() and `unigram_perplexity`, that of the
    tokens the final evaluation of `split` scored (data/unigram.py: the scored targets of
    `eval_batches(split, eval.batch_size, eval.seq_len, eval.tokens)`)."""
    unigram = eval_unigram_perplexity(
        corpus, split, evaluation.batch_size, evaluation.seq_len, evaluation.tokens
    )
    return {**corpus.describe(), UNIGRAM_PERPLEXITY: unigram}


def build_summary(
    *,
    name: str,
    preset: str,
    sweep: str | None,
    corpus,
    evaluation: EvalSection,
    model: ModelConfig,
    final: dict,
    loop: LoopState,
    tokens_per_step: int,
    wall_time: float,
    peak_flops: float | None,
    peak_flops_source: str,
    peak_memory_mb: float,
    expert_optimizer: str | None,
    device: torch.device,
    world_size: int,
    backend: str | None,
    dtype: str,
    diverged: str | None = None,
    prefetch_workers: int = 0,
) -> RunSummary:
    """The summary of a run that trained `loop.step` steps of `tokens_per_step` positions (the
    global batch) and scored `final` (evaluate's dict, with the `evaluation` settings); `sweep`
    (the run's cfg.sweep) picks the paper regime its "regime" compares with (model/regime.py);
    `diverged`: why its evaluation diverged (None: it did not); `prefetch_workers`: the processes
    that made its batches (train/prefetch.py; 0: inline). summary.json is its to_dict(), with the
    GPU telemetry's keys after them where a sampler ran (Trainer._summary)."""
    return RunSummary(
        name=name,
        preset=preset,
        corpus=corpus_dict(corpus, final["split"], evaluation),
        model=model_dict(model),
        diverged=diverged,
        **_evaluation(final, corpus.floor_nats()),
        **_accounting(model, tokens_per_step, loop.step, sweep),
        **_throughput(model, loop, tokens_per_step, world_size, peak_flops),
        peak_flops=peak_flops,
        peak_flops_source=peak_flops_source,
        prefetch_workers=prefetch_workers,
        **_routing(loop),
        peak_memory_mb=peak_memory_mb,
        wall_time_s=wall_time,
        train_time_s=loop.train_time,
        train_tokens=loop.step * tokens_per_step,
        train_scored_tokens=loop.scored_tokens,
        steps=loop.step,
        snapshots=loop.snapshots,
        expert_optimizer=expert_optimizer,
        **_where(device, world_size, backend, dtype),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _evaluation(final: dict, floor: float | None) -> dict:
    """The final evaluation's fields, and the corpus's Bayes-optimal floor (None: unknown)."""
    return {
        "test_perplexity": final["perplexity"],
        "test_nll": final["nll"],
        "excess_nll": final["excess_nll"],
        "oracle_nll": final["oracle_nll"],
        "floor_nll": floor,
        "floor_perplexity": math.exp(floor) if floor is not None else None,
        "eval_split": final["split"],
        "eval_scored_tokens": final["scored_tokens"],
    }


def _accounting(model: ModelConfig, tokens_per_step: int, steps: int, sweep: str | None) -> dict:
    """The model's parameters and operations (model/flops.py) and the regime (model/regime.py)."""
    return {
        "params_total": flops.total_params(model),
        "params_excl_embedding_softmax": flops.params_excl_embedding_softmax(model),
        "ops_per_timestep": flops.ops_per_timestep(model),
        "regime": Regime.from_dict(
            regime.regime(model, tokens_per_step=tokens_per_step, steps=steps, sweep=sweep)
        ),
        "train_flops_per_token": flops.train_flops_per_token(model),
    }


def _throughput(
    model: ModelConfig,
    loop: LoopState,
    tokens_per_step: int,
    world_size: int,
    peak_flops: float | None,
) -> dict:
    """Training positions per second (evaluation excluded), TFLOPS per device and MFU."""
    train_tokens = loop.step * tokens_per_step
    tokens_per_second = train_tokens / loop.train_time if loop.train_time else None
    train_flops = flops.train_flops_per_token(model)
    tflops = train_flops * tokens_per_second / 1e12 / world_size if tokens_per_second else None
    return {
        "tflops_per_device": tflops,
        "mfu": telemetry.mfu(tflops, peak_flops),
        "tokens_per_second": tokens_per_second,
        "input_wait_fraction": input_wait_fraction(loop),
    }


def _routing(loop: LoopState) -> dict:
    """The routing statistics (STATS) averaged over the last steps, and the balance metrics of
    the last expert-statistics record (expertstats.METRICS; null for a dense run)."""
    stats = {
        k: float(np.mean([s[k] for s in loop.recent_stats])) if loop.recent_stats else None
        for k in STATS
    }
    latest = loop.expert_tally.latest if loop.expert_tally is not None else None
    return {**stats, **{k: latest.get(k) if latest else None for k in expertstats.METRICS}}


def _where(device: torch.device, world_size: int, backend: str | None, dtype: str) -> dict:
    """Where and how the run ran."""
    return {
        "device": str(device),
        "world_size": world_size,
        "backend": backend,
        "device_name": device_name(device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
    }


def input_wait_fraction(loop: LoopState) -> float | None:
    """The share of the training time spent waiting for batches (inline: making them; workers:
    waiting for the next one): total input wait / train_time; None before any step, or when some
    steps were trained without counting it (a resumed checkpoint from before the count)."""
    if not loop.train_time or loop.input_wait is None:
        return None
    return loop.input_wait / loop.train_time


def write_summary(run_dir: Path, summary: dict, loop: LoopState, total_steps: int) -> None:
    """summary.json (its presence marks the run finished), after expert_load.json of an MoE run."""
    if loop.expert_load is not None:
        rundir.write_json(
            run_dir / rundir.EXPERT_LOAD_FILE,
            {
                "steps": min(STATS_WINDOW, total_steps),
                "tokens_per_expert": loop.expert_load.tolist(),
            },
        )
    rundir.write_json(run_dir / rundir.SUMMARY_FILE, summary)
