"""Table 6 (App. A) as a figure: CV(importance), CV(load), max/mean load and
perplexity per loss weighting, and the per-expert load with and without the balancing losses.
Pure: frames in, a matplotlib Figure out; the paper and our `balance` sweep in separate columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, paper, style

_METRICS = (
    ("cv_importance", "CV(Importance)"),
    ("cv_load", "CV(Load)"),
    ("max_over_mean_load", "max(Load)/mean(Load)"),
)


def _setting(wi: float, wl: float) -> str:
    return f"{wi:g} / {wl:g}"


def _setting_ticks(ax, df: pd.DataFrame) -> None:
    """One x tick per loss weighting, labelled w_importance / w_load."""
    ax.set_xticks(
        np.arange(len(df)),
        [_setting(a, b) for a, b in zip(df["w_importance"], df["w_load"], strict=True)],
        rotation=25,
    )


def _balance_bars(ax, df: pd.DataFrame) -> None:
    """Grouped bars per loss weighting: CV(importance), CV(load), max/mean load (log y)."""
    x = np.arange(len(df))
    for i, (col, label) in enumerate(_METRICS):
        ax.bar(
            x + (i - 1) * 0.27,
            df[col].clip(lower=1e-3),
            width=0.27,
            label=label,
            color=style.PALETTE[i],
        )
    values = df[[c for c, _ in _METRICS]].to_numpy(float).ravel()
    style.scale(ax, "y", [*values, values.max() * 30])  # always log: CVs and max/mean differ 100x
    top = values.max()
    ax.set_ylim(top=top * 12)  # headroom for the legend
    _setting_ticks(ax, df)
    ax.set(xlabel="w_importance / w_load", ylabel="value (log)")
    ax.legend(loc="upper right", ncol=3, fontsize=7.5)


def _ppl_bars(ax, df: pd.DataFrame, color) -> None:
    x = np.arange(len(df))
    ax.bar(x, df["test_perplexity"], color=color, width=0.6)
    for xi, v in zip(x, df["test_perplexity"], strict=True):
        ax.annotate(
            f"{v:.1f}",
            (xi, v),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            fontsize=7.5,
        )
    lo, hi = df["test_perplexity"].min(), df["test_perplexity"].max()
    ax.set_ylim(lo - 0.6 * (hi - lo) - 0.02 * lo, hi + 0.25 * (hi - lo) + 0.02 * hi)
    _setting_ticks(ax, df)
    ax.set(xlabel="w_importance / w_load", ylabel="test perplexity (axis not from 0)")


def load_pair(summary: pd.DataFrame, loads: pd.DataFrame, sweep: str = "balance") -> dict:
    """{label: per-expert load / mean load} for the run without balancing losses (both weights
    0) and the one with both on (the paper's 0.1/0.1 if run, else the largest weights)."""
    runs = collect.sweep(summary, sweep)
    if runs.empty or loads.empty:
        return {}
    runs = runs[runs["run_id"].isin(loads["run_id"])]
    off = runs[(runs["w_importance"] == 0) & (runs["w_load"] == 0)]
    on = runs[(runs["w_importance"] > 0) & (runs["w_load"] > 0)]
    default = on[(on["w_importance"] == 0.1) & (on["w_load"] == 0.1)]
    on = default if not default.empty else on.sort_values(["w_importance", "w_load"]).iloc[-1:]
    out = {}
    for part in (off, on):
        if part.empty:
            continue
        r = part.iloc[0]
        t = loads[loads["run_id"] == r["run_id"]]["tokens"].to_numpy(float)
        if t.size and t.mean() > 0:
            out[f"w = {_setting(r['w_importance'], r['w_load'])}"] = t / t.mean()
    return out


@style.styled
def table6_balance(summary: pd.DataFrame, loads: pd.DataFrame) -> Figure:
    """Table 6 (App. A): the balancing-loss ablation, paper vs our `balance` sweep.

    Top: CV(Importance), CV(Load) and max/mean load per (w_importance, w_load); bottom: test
    perplexity. Right column: our per-expert load (expert_load.json: routed slots over the last
    steps, divided by the mean) without and with the losses, as a histogram and sorted.
    """
    t6 = paper.load("table6")
    pw = t6.pivot_table(
        index=["w_importance", "w_load"], columns="metric", values="value", sort=False
    ).reset_index()
    pw = pw.rename(columns={"test_perplexity_10_epochs": "test_perplexity"})
    pw = pw.sort_values(["w_importance", "w_load"]).reset_index(drop=True)
    fig, axes = style.new_figure(2, 3, (15, 7.6))
    _balance_bars(axes[0, 0], pw)
    axes[0, 0].set_title("paper: Table 6, MoE-256 on 1B Word")
    _ppl_bars(axes[1, 0], pw, style.COLORS["baseline"])
    axes[1, 0].set_title("paper: test perplexity after 10 epochs")
    ours = collect.balance(summary)
    if ours.empty:
        style.empty_panel(
            axes[0, 1], "this run: sweep balance", f"{style.NOT_RUN}: no runs with sweep=balance"
        )
        style.empty_panel(axes[1, 1], "this run: test perplexity", style.NOT_RUN)
    else:
        _balance_bars(axes[0, 1], ours)
        model = collect.sweep(summary, "balance")["model"].iloc[0]
        axes[0, 1].set_title(f"this run: sweep balance ({model})")
        _ppl_bars(axes[1, 1], ours, style.COLORS["flat MoE"])
        axes[1, 1].set_title("this run: test perplexity")
    pair = load_pair(summary, loads)
    if not pair:
        why = f"{style.NOT_RUN}: no balance run with expert_load.json"
        style.empty_panel(axes[0, 2], "this run: per-expert load", why)
        style.empty_panel(axes[1, 2], "this run: per-expert load, sorted", why)
        return fig
    top = max(v.max() for v in pair.values())
    bins = np.linspace(0, top * 1.02, 31)
    colors = [style.COLORS["early"], style.COLORS["late"]]
    for (label, v), color in zip(pair.items(), colors, strict=False):
        axes[0, 2].hist(
            v,
            bins=bins,
            histtype="stepfilled",
            alpha=0.45,
            color=color,
            label=f"{label} (max/mean {v.max():.2f})",
        )
        axes[1, 2].plot(np.arange(1, v.size + 1), np.sort(v)[::-1], color=color, label=label)
    axes[0, 2].set(xlabel="load / mean load (per expert)", ylabel="experts")
    axes[0, 2].set_title("this run: per-expert load histogram")
    axes[0, 2].legend(loc="upper right")
    axes[1, 2].axhline(1.0, color="0.5", lw=0.8, ls="--")
    axes[1, 2].set(xlabel="expert rank (by load)", ylabel="load / mean load")
    axes[1, 2].set_title("this run: per-expert load, sorted")
    axes[1, 2].legend(loc="upper right")
    return fig
