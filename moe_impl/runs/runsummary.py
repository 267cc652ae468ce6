"""summary.json as a type: `RunSummary`, the fields a finished run's summary holds, in the file's
order, which the trainer fills (moe_impl/train/summary.py, build_summary) and the analysis reads
(analysis/collect.py, analysis/evidence.py) instead of string keys.

`to_dict` is what summary.json holds: the fields in declaration order, "regime" a nested object.
`from_dict` reads any summary back, an older one or one rebuilt from MLflow metrics included:
a missing field takes its default (null, or "test" for eval_split), an unknown key is dropped;
nothing is validated (analysis/collect.py's check_summary does that on the dict). `column` gives
summary.csv's name of a field, nested ones joined by "." as analysis collect flattens them.

Plain Python: no torch, numpy or mlflow, so the workflow and the analysis import it freely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

UNIGRAM_PERPLEXITY = "unigram_perplexity"  # the key summary.json's "corpus" adds to describe()


@dataclass(frozen=True)
class Regime:
    """summary.json's "regime" (moe_impl/model/regime.py, regime): the run's batch, experts per
    token, tokens per expert per step (Sec. 3.1: b·k/n), tokens per parameter and steps, then the
    paper's for the model it stands for (App. C.1 or App. D; null where the paper has none)."""

    batch_positions: int | None = None
    experts_per_token: int | None = None
    tokens_per_expert_per_step: float | None = None
    tokens_per_parameter: float | None = None
    steps: int | None = None
    paper_preset: str | None = None
    paper_batch_positions: int | None = None
    paper_tokens_per_expert_per_step: float | None = None
    paper_tokens_per_parameter: float | None = None
    paper_steps: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Regime:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class RunSummary:
    """A finished run's summary.json (moe_impl/runs/rundir.py: SUMMARY_KEYS are among these and
    always written; null where a run has no value)."""

    name: str | None = None
    preset: str | None = None
    corpus: dict | None = None  # the corpus's describe() and UNIGRAM_PERPLEXITY
    model: dict | None = None  # the resolved ModelConfig's flat form (.flat(), lists for tuples)
    test_perplexity: float | None = None  # null where the evaluation diverged
    diverged: str | None = None  # why the final evaluation diverged, in one line; else null
    test_nll: float | None = None
    excess_nll: float | None = None
    oracle_nll: float | None = None
    floor_nll: float | None = None
    floor_perplexity: float | None = None
    eval_split: str = "test"
    eval_scored_tokens: int | None = None
    params_total: int | None = None
    params_excl_embedding_softmax: int | None = None
    ops_per_timestep: int | None = None
    regime: Regime | None = None
    train_flops_per_token: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    peak_flops: float | None = None
    peak_flops_source: str | None = None
    tokens_per_second: float | None = None
    input_wait_fraction: float | None = None
    prefetch_workers: int | None = None
    # the routing statistics of the last steps (moe_impl/train/state.py, STATS)
    cv_importance: float | None = None
    cv_load: float | None = None
    max_over_mean_load: float | None = None
    # the last expert-statistics record's (moe_impl/runs/expertstats.py, METRICS)
    max_violation: float | None = None
    dead_expert_fraction: float | None = None
    top20_load_share: float | None = None
    gate_entropy: float | None = None
    group_max_violation: float | None = None
    group_dead_fraction: float | None = None
    group_top20_load_share: float | None = None
    primary_gate_entropy: float | None = None
    secondary_gate_entropy: float | None = None
    peak_memory_mb: float | None = None
    wall_time_s: float | None = None
    train_time_s: float | None = None
    train_tokens: int | None = None
    train_scored_tokens: int | None = None
    steps: int | None = None
    snapshots: list[dict] | None = None  # the evaluations at train.eval.at_tokens
    expert_optimizer: str | None = None
    device: str | None = None
    world_size: int | None = None
    backend: str | None = None
    device_name: str | None = None
    dtype: str | None = None
    threads: int | None = None
    torch_version: str | None = None
    python: str | None = None
    finished: str | None = None  # UTC, ISO 8601 to the second

    def to_dict(self) -> dict:
        """summary.json's object: every field, in declaration order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        kw = _known(cls, data)
        if isinstance(kw.get("regime"), Mapping):
            kw["regime"] = Regime.from_dict(kw["regime"])
        return cls(**kw)


def _known(cls, data: Mapping[str, Any]) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


NESTED = {"regime": Regime}  # the typed nested objects; "corpus" and "model" are free-form


def column(name: str, key: str | None = None) -> str:
    """summary.csv's column of summary.json's field `name` (of its key `key` in a nested object:
    "regime", "batch_positions" -> "regime.batch_positions"); a ValueError for a name that is no
    field."""
    if name not in {f.name for f in fields(RunSummary)}:
        raise ValueError(f"summary.json has no field {name!r}")
    if key is None:
        return name
    nested = NESTED.get(name)
    if nested is not None and key not in {f.name for f in fields(nested)}:
        raise ValueError(f"summary.json's {name!r} has no field {key!r}")
    return f"{name}.{key}"
