"""Fig. 2-left (Sec. 5.1): test perplexity vs parameters excl. embedding and softmax (Table 7).

Pure: frames in, a matplotlib Figure out. The paper's Table 7 models and our `lm1b` sweep sit in
separate panels (a perplexity on the synthetic corpus is not one on 1B Word).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, paper, slope, style


def _params_panel(ax, pts: pd.DataFrame) -> None:
    """Baselines as distinct grey markers, flat and hierarchical MoE as lines with the expert
    count beside each point. pts: family, model, num_experts, x, y; with n_runs, y_min and y_max
    (our runs), a bar over the seeds' range at each model with >= 2 runs.

    Baselines share (nearly) one x, so they are dodged sideways by up to ±10% of x (a log axis:
    a small, constant visual offset) to keep every marker visible."""
    base = pts[pts["family"] == "baseline"]
    dodge = np.linspace(-0.1, 0.1, len(base)) if len(base) > 1 else [0.0]
    pts = pts.copy()
    pts.loc[base.index, "x"] = base["x"] * (1 + np.asarray(dodge))
    base = pts.loc[base.index]
    for i, (_, r) in enumerate(base.iterrows()):
        ax.plot(
            r["x"],
            r["y"],
            style.BASELINE_MARKERS[i % len(style.BASELINE_MARKERS)],
            ms=7,
            color=style.COLORS["baseline"],
            mec="white",
            mew=0.5,
            label=r["model"],
            ls="none",
        )
    for fam, offset, va in (("flat MoE", (-5, -11), "top"), ("hierarchical MoE", (5, 4), "bottom")):
        part = pts[pts["family"] == fam].sort_values("x")
        if part.empty:
            continue
        label = f"{fam} (k=4)" if fam == "flat MoE" else f"{fam} (k=2+2)"
        ax.plot(
            part["x"],
            part["y"],
            "-" + style.FAMILY_MARKERS[fam],
            color=style.COLORS[fam],
            ms=6,
            label=label,
        )
        for _, r in part.iterrows():
            ax.annotate(
                f"{int(r['num_experts']):,}",
                (r["x"], r["y"]),
                textcoords="offset points",
                xytext=offset,
                ha="center",
                va=va,
                fontsize=7.5,
                color=style.COLORS[fam],
            )
    bars = style.seed_errorbars(ax, pts, "x", "y")
    style.scale(ax, "x", pts["x"])
    ax.margins(x=0.08, y=0.1)
    title = "experts beside points" + (f"\nbars: {style.SEED_BARS}" if bars else "")
    style.legend(ax, title=title, title_fontsize=7.5)


@style.styled
def figure2_left(summary: pd.DataFrame, paper_points: pd.DataFrame | None = None) -> Figure:
    """Fig. 2-left (Sec. 5.1): test perplexity vs capacity at ~constant ops/timestep.

    Left panel: the paper's Table 7 models after 10 epochs; right: our `lm1b` sweep's runs (mean
    over seeds, a bar from the lowest to the highest seed where a model has >= 2 runs), with the
    flat and hierarchical MoE lines and the compute-matched baselines, at the sweep's full token
    count (runs that stop earlier, Fig. 2-right's larger budgets, are left out). Each panel notes
    the slope of ln(perplexity) on ln(experts) of its compute-matched MoE models (claim 1 as a
    number, analysis/slope.py).
    """
    pts = paper.figure2_left_series() if paper_points is None else paper_points
    pts = pts.assign(
        family=pts["series"],
        num_experts=collect.paper_structure(pts["preset"])["num_experts"],
        x=pts["params_excl_embedding_softmax_M"],
        y=pts["test_perplexity_10_epochs"],
    )
    fig, axes = style.new_figure(1, 2, (11.5, 4.6))
    ax_p, ax_r = axes[0]
    _params_panel(ax_p, pts)
    ax_p.set(xlabel=style.PARAMS_LABEL, ylabel="test perplexity after 10 epochs")
    ax_p.set_title("paper: 1B Word, Table 7 (~8M ops/timestep)")
    moe = pts[pts["family"] != "baseline"]
    _slope_note(ax_p, slope.paper_slope(moe.assign(test_perplexity=moe["y"])))
    ours = collect.per_model(
        collect.sweep(summary, "lm1b"),
        ["params_excl_embedding_softmax", "test_perplexity", "ops_per_timestep", "train_tokens"],
        spread=["test_perplexity"],
    )
    # at the sweep's full token count only: runs trained for fewer tokens (Fig. 2-right's larger
    # budgets, whose ops/timestep are several times the base one) are not on this figure
    ours = ours[ours["train_tokens"] >= ours["train_tokens"].max()] if not ours.empty else ours
    title = "this run: sweep lm1b"
    if ours.empty:
        style.empty_panel(ax_r, title, f"{style.NOT_RUN}: no runs with sweep=lm1b")
        return fig
    ops = ours["ops_per_timestep"] / 1e6
    _params_panel(
        ax_r,
        ours.assign(
            x=ours["params_excl_embedding_softmax"] / 1e6,
            y=ours["test_perplexity"],
            y_min=ours["test_perplexity_min"],
            y_max=ours["test_perplexity_max"],
        ),
    )
    ax_r.set(
        xlabel=style.PARAMS_LABEL,
        ylabel=f"test perplexity after {style.fmt_tokens(ours['train_tokens'].max())} tokens",
    )
    ax_r.set_title(f"{title} ({ops.min():.3g}-{ops.max():.3g}M ops/timestep)")
    _slope_note(ax_r, slope.ours(summary))
    return fig


def _slope_note(ax, fit: slope.Slope | None) -> None:
    """Claim 1 as a number in the panel's corner: the slope of ln(perplexity) on ln(experts) of
    its compute-matched MoE models (analysis/slope.py), with the bootstrap interval over seeds."""
    if fit is None:
        return
    interval = f" [{fit.low:+.3f}, {fit.high:+.3f}]" if fit.high > fit.low else ""
    ax.text(
        0.02,
        0.03,
        f"MoE slope d ln ppl / d ln experts: {fit.slope:+.3f}{interval}",
        transform=ax.transAxes,
        fontsize=7.5,
        color="0.25",
        ha="left",
        va="bottom",
    )
