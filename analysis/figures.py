"""The paper's figures from our runs, beside the paper's own numbers (Tables 6-8, Figs. 2-3): the registry.

One module per figure, each a pure function, frames in and a matplotlib Figure out (no files;
analysis/io.py saves them), styled by analysis/style.py:
  figure2_left    fig_figure2_left.py: Fig. 2-left, test perplexity vs parameters excl.
                  embedding and softmax (Table 7)
  figure2_right   fig_figure2_right.py: Fig. 2-right, test perplexity vs ops/timestep, LSTM line
                  vs MoE line (Table 7)
  figure3         fig_figure3.py: Fig. 3, test perplexity vs parameters after N and 10N tokens,
                  and the gap (Table 8)
  table6_balance  fig_table6_balance.py: Table 6, CV(importance), CV(load), max/mean load and
                  perplexity per loss weighting, and the per-expert load with and without the
                  losses (App. A)
  perf_scaling    fig_perf_scaling.py: the layer benchmark, µs/token and ratio to the
                  FLOP-matched dense FFN vs experts, with the peers' measurements where the
                  configuration is the same
  efficiency      fig_efficiency.py: throughput and MFU per device vs experts, beside Tables
                  7/8's TFLOPS/GPU (§5.1)
The paper and our runs never share an axis where the scales differ (a perplexity on the synthetic
corpus is not one on 1B Word): each figure has "paper: ..." and "this run: ..." panels.

FIGURES is the one list of figure names (the workflow's outputs, workflow/rules/common.smk, read it
from here). Importing this module loads no plotting library: a figure's module is imported when its
function is first used (`figures.figure3`, `plot_function`, `all_figures`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "all_figures", "plot_function"]

# figure name -> the frames its function takes, in order; the function is <name> in fig_<name>.py
_FRAMES = {
    "figure2_left": ("summary",),
    "figure2_right": ("summary", "snapshots"),
    "figure3": ("summary", "snapshots"),
    "table6_balance": ("summary", "loads"),
    "perf_scaling": ("bench",),
    "efficiency": ("summary", "bench"),
}
FIGURES = tuple(_FRAMES)


def plot_function(name: str) -> Callable[..., Figure]:
    """The function drawing figure `name` (imports its module, and so matplotlib, on first use)."""
    if name not in _FRAMES:
        raise ValueError(f"unknown figure {name!r}; the figures are {', '.join(FIGURES)}")
    return getattr(importlib.import_module(f"analysis.fig_{name}"), name)


def __getattr__(name: str) -> Callable[..., Figure]:
    """`figures.figure3` and the like, imported lazily (PEP 562)."""
    if name in _FRAMES:
        return plot_function(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def all_figures(
    summary: pd.DataFrame,
    snapshots: pd.DataFrame,
    loads: pd.DataFrame,
    bench: pd.DataFrame,
    names: list[str] | None = None,
) -> dict[str, Figure]:
    """The figures `names` (default: all of FIGURES), by output name (figures/<name>.png|pdf)."""
    frames = {"summary": summary, "snapshots": snapshots, "loads": loads, "bench": bench}
    return {
        name: plot_function(name)(*(frames[f] for f in _FRAMES[name]))
        for name in (names or FIGURES)
    }
