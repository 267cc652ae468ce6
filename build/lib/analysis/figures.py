"""The paper's figures from our runs, beside the paper's own numbers (paper.md §2-3): the registry.

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
                  FLOP-matched dense FFN vs experts, with peers.md's measurements where the
                  configuration is the same
  efficiency      fig_efficiency.py: throughput and MFU per device vs experts, beside Tables
                  7/8's TFLOPS/GPU (§5.1)
The paper and our runs never share an axis where the scales differ (a perplexity on the synthetic
corpus is not one on 1B Word): each figure has "paper: ..." and "this run: ..." panels.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.fig_efficiency import efficiency
from analysis.fig_figure2_left import figure2_left
from analysis.fig_figure2_right import figure2_right
from analysis.fig_figure3 import figure3
from analysis.fig_perf_scaling import perf_scaling
from analysis.fig_table6_balance import table6_balance

__all__ = [
    "FIGURES",
    "all_figures",
    "efficiency",
    "figure2_left",
    "figure2_right",
    "figure3",
    "perf_scaling",
    "table6_balance",
]

FIGURES = (
    "figure2_left",
    "figure2_right",
    "figure3",
    "table6_balance",
    "perf_scaling",
    "efficiency",
)


def all_figures(
    summary: pd.DataFrame,
    snapshots: pd.DataFrame,
    loads: pd.DataFrame,
    bench: pd.DataFrame,
    names: list[str] | None = None,
) -> dict[str, Figure]:
    """The figures `names` (default: all of FIGURES), by output name (figures/<name>.png|pdf)."""
    makers = {
        "figure2_left": lambda: figure2_left(summary),
        "figure2_right": lambda: figure2_right(summary),
        "figure3": lambda: figure3(summary, snapshots),
        "table6_balance": lambda: table6_balance(summary, loads),
        "perf_scaling": lambda: perf_scaling(bench),
        "efficiency": lambda: efficiency(summary, bench),
    }
    return {name: makers[name]() for name in (names or FIGURES)}
