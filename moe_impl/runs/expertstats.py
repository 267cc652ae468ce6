"""Per-expert statistics over training (issue 31): the load and Importance of every expert of the
MoE layer, recorded as a run goes, and the balance metrics drawn from them. Torch-free (numpy).

What is counted, per expert (the layer's RoutingStats, moe_impl/layer/flat.py):

- load: the integer number of slots routed to the expert (`tokens_per_expert`, the true load of
  Table 6, not the smooth Load of Eq. 10);
- importance: Importance(X) = Σ_x G(x), the summed gate values (Eq. 6; Eq. 13 when hierarchical).

A hierarchical layer's groups are derived from its experts (expert (i, j) is row i·b + j, App. B):
a group's load is the slots routed into it (k_secondary per (token, group) pair) and its
importance the sum of its experts', Σ_x G_primary(x)_i Σ_j G_i(x)_j = Σ_x G_primary(x)_i, the
primary gate's own Importance (Eq. 6), since each secondary gate's values sum to 1 (Eq. 3-5).

The layout, RUN_DIR/expert_stats/:

    layout.json          {"version", "num_experts", "num_groups" (null: flat), "window",
                          "total_steps", "snapshots", "columns", "quantiles"}
    records.f64          one row per record, little-endian float64, `columns` in order, appended
                         as the run goes (a killed run's partial last row is dropped on read)
    step-NNNNNNNN.npz    the full vectors of the record at that step: "load" (int32, or int64
                         if a count needs it), "importance" (float32), and for hierarchical runs
                         "group_load", "group_importance"

A record is written every `train.log_every` steps and at the last step (runs.runinfo.tracked_step,
the steps MLflow gets) and sums the steps since the previous record ("steps"). Its row holds the
step, the steps summed, the record's metrics below, and per level (expert, and group when
hierarchical) the quantiles min, p10, p50, p90, max of load and of importance over the level's
entries and the number of entries with zero load. Full vectors are kept at SNAPSHOTS records, the
first record at or after each k/SNAPSHOTS of the run (k = 1..SNAPSHOTS, the last one the final
step), which bounds the file: at 131072 experts (256 × 512) 8 · 1 MiB + 264 B per record (about
11 MB for 10,000 records).

The balance metrics (metrics.jsonl at each record, summary.json for the last one):

- max_violation: MaxVio = max(load) / mean(load) − 1 over the record's steps;
- dead_expert_fraction: the share of experts that got no slot in the last `window` steps
  (`train.dead_expert_window`; fewer at the start of the run);
- top20_load_share: the share of the record's slots that went to the busiest ⌈0.2·n⌉ experts;
- gate_entropy: the mean over the record's steps of the layer's mean gate entropy in nats
  (RoutingStats.gate_entropy: −Σ_i G(x)_i ln G(x)_i over a token's experts, at most ln k).

Hierarchical runs add the same for the level of groups (GROUP_METRICS): group_max_violation,
group_dead_fraction and group_top20_load_share over the groups' loads, and the entropies of the
two levels' gates, primary_gate_entropy (per token) and secondary_gate_entropy (per (token, group)
pair).

Resumed runs: the tally since the last record (`ExpertTally`) lives in the checkpoint, and
`truncate` cuts the files back to the checkpoint's step, so a resumed run's files equal an
uninterrupted run's byte for byte.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_impl.runs import rundir

STATS_DIR = "expert_stats"
LAYOUT_FILE = "layout.json"
RECORDS_FILE = "records.f64"
VERSION = 2  # 1: no entropies and no group metrics (read alike: a file names its columns)
SNAPSHOTS = 8  # full vectors at the first record after each eighth of the run (the last included)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
QUANTILE_NAMES = ("min", "p10", "p50", "p90", "max")
TOP_FRACTION = 0.2  # top20_load_share: the busiest 20% of experts
EXPERT_METRICS = ("max_violation", "dead_expert_fraction", "top20_load_share", "gate_entropy")
GROUP_METRICS = (
    "group_max_violation",
    "group_dead_fraction",
    "group_top20_load_share",
    "primary_gate_entropy",
    "secondary_gate_entropy",
)
METRICS = EXPERT_METRICS + GROUP_METRICS  # summary.json's keys; null where a run has no value
ENTROPIES = ("gate_entropy", "primary_gate_entropy", "secondary_gate_entropy")
_ROW = np.dtype("<f8")


# --- the metrics ---------------------------------------------------------------------------------


def max_violation(load: np.ndarray) -> float:
    """MaxVio = max(load) / mean(load) − 1 (0 for a perfectly balanced layer); NaN without slots."""
    mean = float(np.mean(load))
    return float(np.max(load)) / mean - 1.0 if mean > 0 else math.nan


def dead_expert_fraction(last_seen: np.ndarray, step: int, window: int) -> float:
    """The share of experts with no slot in steps step − window + 1 .. step (1-based; from step 1
    while step < window); `last_seen`: each expert's last step with a slot, 0 for never."""
    return float(np.mean(last_seen <= max(step - window, 0)))


def top_load_share(load: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """The share of all slots on the busiest ⌈fraction·n⌉ experts; NaN without slots."""
    total = float(np.sum(load))
    if total <= 0:
        return math.nan
    n = max(1, math.ceil(fraction * load.size))
    return float(np.sum(np.partition(load, load.size - n)[load.size - n :])) / total


# --- the tally between records -------------------------------------------------------------------


@dataclass(kw_only=True)
class ExpertTally:
    """What the training loop accumulates between records (kept in checkpoints)."""

    load: np.ndarray  # (E,) int64 slots since the last record
    importance: np.ndarray  # (E,) float64 Importance since the last record
    last_seen: np.ndarray  # (E,) int64 the last step (1-based) with a slot, 0: never
    steps: int = 0  # steps summed since the last record
    last_record: int = 0  # the step of the last record (0: none yet)
    num_groups: int | None = None  # hierarchical: a groups of E / a experts
    latest: dict | None = None  # the last record's metrics
    # Σ over the steps since the last record of the step's mean gate entropies (ENTROPIES order),
    # and the steps that gave one (a tally from a checkpoint before VERSION 2 lacks the first ones)
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(len(ENTROPIES)))
    entropy_steps: int = 0

    @classmethod
    def new(cls, num_experts: int, num_groups: int | None = None) -> ExpertTally:
        return cls(
            load=np.zeros(num_experts, np.int64),
            importance=np.zeros(num_experts, np.float64),
            last_seen=np.zeros(num_experts, np.int64),
            num_groups=num_groups,
        )

    def add(
        self,
        step: int,
        load: np.ndarray,
        importance: np.ndarray,
        entropy: tuple[float | None, ...] = (),
    ) -> None:
        """Count training step `step` (1-based): its slots and Importance per expert, and its mean
        gate entropies (ENTROPIES order; None or missing: not computed, NaN in the record)."""
        self.load += load
        self.importance += importance
        self.last_seen[load > 0] = step
        self.steps += 1
        values = [math.nan if v is None else v for v in entropy]
        self.entropy += np.asarray(values + [math.nan] * (len(ENTROPIES) - len(values)))
        self.entropy_steps += 1

    @property
    def hierarchical(self) -> bool:
        return bool(self.num_groups)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, saved: dict | None) -> ExpertTally | None:
        return None if saved is None else cls(**saved)


# --- the files -----------------------------------------------------------------------------------


def metric_names(hierarchical: bool) -> tuple[str, ...]:
    """The metrics a record of such a run has."""
    return METRICS if hierarchical else EXPERT_METRICS


def columns(hierarchical: bool) -> tuple[str, ...]:
    """records.f64's columns, in order."""
    out = ["step", "steps", *metric_names(hierarchical)]
    for level in ("group", "expert") if hierarchical else ("expert",):
        for what in ("load", "importance"):
            out += [f"{level}_{what}_{q}" for q in QUANTILE_NAMES]
        out.append(f"{level}_zero_load")
    return tuple(out)


def snapshot_due(step: int, previous: int, total_steps: int) -> bool:
    """Whether the record at `step` (the one before at `previous`) keeps full vectors: the first
    record at or after each k/SNAPSHOTS of the run, and the last step."""
    crossed = step * SNAPSHOTS // total_steps > previous * SNAPSHOTS // total_steps
    return crossed or step == total_steps


def _levels(tally: ExpertTally) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(level, load, importance) for each recorded level, groups first."""
    out = []
    if tally.num_groups:
        a = tally.num_groups
        out.append(
            ("group", tally.load.reshape(a, -1).sum(1), tally.importance.reshape(a, -1).sum(1))
        )
    return [*out, ("expert", tally.load, tally.importance)]


def _metrics(tally: ExpertTally, step: int, window: int) -> dict:
    """The record's metrics (metric_names): balance per level, mean gate entropies."""
    means = tally.entropy / tally.entropy_steps if tally.entropy_steps else [math.nan] * 3
    out = {
        "max_violation": max_violation(tally.load),
        "dead_expert_fraction": dead_expert_fraction(tally.last_seen, step, window),
        "top20_load_share": top_load_share(tally.load),
        "gate_entropy": float(means[0]),
    }
    if tally.hierarchical:
        a = tally.num_groups
        assert a is not None  # hierarchical
        group_load = tally.load.reshape(a, -1).sum(1)
        out |= {
            "group_max_violation": max_violation(group_load),
            "group_dead_fraction": dead_expert_fraction(
                tally.last_seen.reshape(a, -1).max(1), step, window
            ),
            "group_top20_load_share": top_load_share(group_load),
            "primary_gate_entropy": float(means[1]),
            "secondary_gate_entropy": float(means[2]),
        }
    return out


def _row(tally: ExpertTally, step: int, metrics: dict, names: list[str]) -> np.ndarray:
    """The record's row under the file's columns `names` (a column it lacks: NaN)."""
    values = {"step": step, "steps": tally.steps, **metrics}
    for level, load, importance in _levels(tally):
        for what, v in (("load", load), ("importance", importance)):
            values |= dict(
                zip(
                    (f"{level}_{what}_{q}" for q in QUANTILE_NAMES),
                    np.quantile(v, QUANTILES),
                    strict=True,
                )
            )
        values[f"{level}_zero_load"] = int(np.sum(load == 0))
    return np.asarray([values.get(name, math.nan) for name in names], dtype=_ROW)


def _narrow(load: np.ndarray) -> np.ndarray:
    return load.astype(np.int32 if load.max(initial=0) < 2**31 else np.int64)


def stats_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATS_DIR


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return stats_dir(run_dir) / f"step-{step:08d}.npz"


def write_layout(run_dir: str | Path, tally: ExpertTally, total_steps: int, window: int) -> None:
    """layout.json (the same text on every resume of the run)."""
    folder = stats_dir(run_dir)
    folder.mkdir(exist_ok=True)
    layout = {
        "version": VERSION,
        "num_experts": int(tally.load.size),
        "num_groups": tally.num_groups,
        "window": window,
        "total_steps": total_steps,
        "snapshots": SNAPSHOTS,
        "columns": list(columns(bool(tally.num_groups))),
        "quantiles": list(QUANTILES),
    }
    rundir.write_json(folder / LAYOUT_FILE, layout)


def record(
    run_dir: str | Path | None, tally: ExpertTally, step: int, total_steps: int, window: int
) -> dict:
    """Close the record at `step`: its METRICS (returned, and kept as tally.latest), its row and,
    when due, its full vectors written under run_dir (None: write nothing, a rank other than 0);
    the tally then starts the next record."""
    metrics = _metrics(tally, step, window)
    if run_dir is not None:
        layout_path = stats_dir(run_dir) / LAYOUT_FILE
        if not layout_path.exists():
            write_layout(run_dir, tally, total_steps, window)
        if snapshot_due(step, tally.last_record, total_steps):
            _write_snapshot(run_dir, tally, step)
        # a run begun under an older VERSION keeps its file's columns
        names = json.loads(layout_path.read_text())["columns"]
        _append_row(run_dir, _row(tally, step, metrics, names))
    tally.load[:] = 0
    tally.importance[:] = 0.0
    tally.entropy[:] = 0.0
    tally.steps, tally.entropy_steps, tally.last_record, tally.latest = 0, 0, step, metrics
    return metrics


def _write_snapshot(run_dir: str | Path, tally: ExpertTally, step: int) -> None:
    arrays: dict[str, Any] = {}
    for level, load, importance in _levels(tally):
        prefix = "" if level == "expert" else "group_"
        arrays[f"{prefix}load"] = _narrow(load)
        arrays[f"{prefix}importance"] = importance.astype(np.float32)
    path = snapshot_path(run_dir, step)
    tmp = path.with_name(f".tmp-{path.name}")  # not a step-*.npz until whole
    np.savez(tmp, step=np.int64(step), steps=np.int64(tally.steps), **arrays)
    os.replace(tmp, path)


def _append_row(run_dir: str | Path, row: np.ndarray) -> None:
    with open(stats_dir(run_dir) / RECORDS_FILE, "ab", buffering=0) as f:
        f.write(row.tobytes())


def truncate(run_dir: str | Path, step: int) -> None:
    """Cut the files back to what the checkpoint at `step` had written (a resume): rows and
    snapshots of later steps go; step 0 (no checkpoint) removes them all."""
    folder = stats_dir(run_dir)
    if not folder.is_dir():
        return
    for path in folder.glob("step-*.npz"):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()
    rows = _rows(folder)
    if rows is not None:
        kept = rows[rows[:, 0] <= step] if rows.size else rows
        tmp = folder / (RECORDS_FILE + ".tmp")
        tmp.write_bytes(kept.astype(_ROW).tobytes())
        os.replace(tmp, folder / RECORDS_FILE)
    if step == 0:
        (folder / LAYOUT_FILE).unlink(missing_ok=True)


# --- reading (the analysis) ----------------------------------------------------------------------


def _rows(folder: Path) -> np.ndarray | None:
    layout_path, path = folder / LAYOUT_FILE, folder / RECORDS_FILE
    if not layout_path.exists() or not path.exists():
        return None
    width = len(json.loads(layout_path.read_text())["columns"])
    data = np.fromfile(path, dtype=_ROW)
    return data[: data.size // width * width].reshape(-1, width)  # a partial last row dropped


def read_expert_stats(run_dir: str | Path) -> dict | None:
    """A run's expert statistics, None when it has none (a dense run, or before its first record):
    {"layout": layout.json, "records": {column: (records,) float64 array},
    "snapshots": {step: {"steps", "load", "importance"[, "group_load", "group_importance"]}}}."""
    folder = stats_dir(run_dir)
    rows = _rows(folder)
    if rows is None:
        return None
    layout = json.loads((folder / LAYOUT_FILE).read_text())
    snapshots = {}
    for path in sorted(folder.glob("step-*.npz")):
        with np.load(path) as npz:
            snapshots[int(npz["step"])] = {k: npz[k] for k in npz.files if k != "step"}
    records = {name: rows[:, i] for i, name in enumerate(layout["columns"])}
    return {"layout": layout, "records": records, "snapshots": snapshots}
