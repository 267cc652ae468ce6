"""Inside the experts (issue 31): how the load spreads over the experts as a run trains.

Pure: a run's expert statistics (moe_impl.runs.expertstats.read_expert_stats: full load vectors at
a few points of the run, balance metrics at every record) or the summary frame in, a matplotlib
Figure out.

- `run_figure`: a heatmap of each expert's share of the slots at the recorded points of the run
  (experts sorted by their final load, the busiest on top; above MAX_ROWS experts, consecutive
  experts of that order averaged into MAX_ROWS bins), as load / mean load on a log colour scale
  (1 = balanced, 0 = no slot: the darkest colour), beside the final load's Lorenz curve with its
  Gini coefficient (0: every expert the same load; 1: one expert takes all).
- `sweep_figure`: a sweep's dead-expert share and MaxVio (max load / mean load − 1) against the
  number of experts, one point per model at the mean of its runs (summary.json's
  `dead_expert_fraction` and `max_violation`).
- `balance_figure`: the balance sweep's heatmaps side by side, without and with the balancing
  losses (w_importance, w_load), the time-resolved companion of Table 6.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis import collect, style

MAX_ROWS = 256  # heatmap rows at most: more experts are binned
FLOOR = 1e-2  # load / mean below this (and zero) is drawn as this: the log scale's bottom


def shares(stats: dict) -> tuple[np.ndarray, list[int]]:
    """(experts x recorded points) of load / mean load, experts sorted by their final load (the
    busiest first) and binned to at most MAX_ROWS rows; the recorded steps."""
    steps = sorted(stats["snapshots"])
    loads = np.stack([stats["snapshots"][s]["load"].astype(float) for s in steps], axis=1)
    means = loads.mean(axis=0, keepdims=True)
    rel = np.divide(loads, means, out=np.zeros_like(loads), where=means > 0)
    rel = rel[np.argsort(-loads[:, -1], kind="stable")]
    if rel.shape[0] > MAX_ROWS:
        edges = np.linspace(0, rel.shape[0], MAX_ROWS + 1).astype(int)
        rel = np.add.reduceat(rel, edges[:-1], axis=0) / np.diff(edges)[:, None]
    return rel, steps


def lorenz(load: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(share of experts, share of slots they take, Gini): the experts from the least to the
    most loaded; Gini = 1 − 2·(area under the curve), 0 for equal loads."""
    x = np.sort(np.asarray(load, float))
    total = x.sum()
    n = x.size
    cum = np.concatenate([[0.0], np.cumsum(x) / total]) if total > 0 else np.linspace(0, 1, n + 1)
    frac = np.linspace(0.0, 1.0, n + 1)
    area = float(np.sum((cum[1:] + cum[:-1]) / 2) / n)
    return frac, cum, 1.0 - 2.0 * area


def _heatmap(ax, stats: dict, title: str, vmax: float | None = None) -> None:
    """`vmax`: the colour scale's top (default: this run's largest load / mean load)."""
    rel, steps = shares(stats)
    image = ax.imshow(
        np.maximum(rel, FLOOR),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=FLOOR, vmax=vmax or max(float(rel.max()), 1.0)),
        extent=(-0.5, len(steps) - 0.5, rel.shape[0] - 0.5, -0.5),
    )
    ax.set_xticks(range(len(steps)), [f"{s:,}" for s in steps], rotation=45, fontsize=7)
    n = stats["layout"]["num_experts"]
    binned = f" (binned to {rel.shape[0]} rows)" if rel.shape[0] < n else ""
    ax.set(xlabel="training step", ylabel=f"{n:,} experts by final load{binned}")
    ax.set_title(title)
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, label="load / mean load (log)")


def _lorenz(ax, stats: dict) -> None:
    last = stats["snapshots"][max(stats["snapshots"])]["load"]
    frac, cum, gini = lorenz(last)
    ax.plot(frac, cum, color=style.COLORS["MoE"], label=f"final load, Gini {gini:.2f}")
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", label="equal load")
    ax.set(xlabel="share of experts (least loaded first)", ylabel="share of slots")
    ax.set_title("Lorenz curve")
    style.legend(ax)


@style.styled
def run_figure(stats: dict, name: str) -> Figure:
    """One run: the load heatmap over training and the final load's Lorenz curve."""
    fig, axes = style.new_figure(1, 2, (11.0, 4.4), width_ratios=[2.2, 1])
    _heatmap(axes[0][0], stats, f"{name}: expert load over training")
    _lorenz(axes[0][1], stats)
    return fig


@style.styled
def sweep_figure(summary: pd.DataFrame, sweep: str) -> Figure:
    """A sweep's dead-expert share and MaxVio against the number of experts (model means), the
    models trained for the sweep's full token count."""
    runs = collect.sweep(summary, sweep)
    runs = runs[runs["num_experts"].fillna(0) > 1] if not runs.empty else runs
    if not runs.empty and "train_tokens" in runs:  # one line per family: the sweep's full budget
        # (Fig. 2-right's larger models train fewer tokens at the same expert counts)
        runs = runs[runs["train_tokens"] >= runs["train_tokens"].max()]
    fig, axes = style.new_figure(1, 2, (10.0, 4.0))
    titles = {"dead_expert_fraction": "dead experts (share)", "max_violation": "MaxVio"}
    for ax, (col, title) in zip(axes[0], titles.items(), strict=True):
        if runs.empty or col not in runs or runs[col].isna().all():
            style.empty_panel(
                ax, f"sweep {sweep}: {title}", f"{style.NOT_RUN}: no expert statistics"
            )
            continue
        m = collect.per_model(runs, [col])
        for fam, part in m.groupby("family"):
            ax.plot(
                part["num_experts"],
                part[col],
                "-" + style.FAMILY_MARKERS.get(fam, "o"),
                color=style.COLORS.get(fam, "0.3"),
                label=fam,
            )
        ax.set_xscale("log", base=2)
        style.sparse_log2_ticks(ax, m["num_experts"])
        ax.set(xlabel=style.EXPERTS_LABEL, ylabel=title)
        ax.set_ylim(bottom=0)  # shares and MaxVio are >= 0
        ax.set_title(f"sweep {sweep}: {title} at the end of training")
        style.legend(ax)
    return fig


@style.styled
def balance_figure(panels: list[tuple[str, dict]]) -> Figure:
    """The balance sweep's heatmaps side by side: (label, stats) per run, e.g. without and with
    the balancing losses, on one colour scale so that the panels compare."""
    fig, axes = style.new_figure(1, max(len(panels), 1), (5.6 * max(len(panels), 1), 4.4))
    if not panels:
        style.empty_panel(axes[0][0], "balance", f"{style.NOT_RUN}: no expert statistics")
    vmax = max([1.0, *(float(shares(stats)[0].max()) for _, stats in panels)])
    for ax, (label, stats) in zip(axes[0], panels, strict=False):
        _heatmap(ax, stats, label, vmax)
    return fig
