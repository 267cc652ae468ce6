"""Fig. 2-right (Sec. 5.1): test perplexity vs ops/timestep, LSTM line vs MoE line (Table 7).

Pure: frames in, a matplotlib Figure out. The paper's lines and our `lm1b` sweep sit in separate
panels (a perplexity on the synthetic corpus is not one on 1B Word).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, paper, style

# (paper line, metric) -> (label, line style, colour)
_PAPER_LINES = {
    ("LSTM (Jozefowicz et al.)", "test_perplexity_final"): (
        "LSTM (Jozefowicz et al.), final",
        "-",
        style.COLORS["LSTM"],
    ),
    ("LSTM (Jozefowicz et al.)", "test_perplexity_10_epochs"): (
        "LSTM, at 10 epochs",
        "--",
        style.COLORS["LSTM"],
    ),
    ("MoE (~4B params)", "test_perplexity_10_epochs"): (
        "MoE (~4B params), 10 epochs",
        "-",
        style.COLORS["MoE"],
    ),
}


def _label_points(ax, xs, ys, names) -> None:
    """Name each point, to its right unless another point sits there (then to its left)."""
    ax.autoscale_view()
    to_frac = ax.transScale + ax.transLimits  # data -> axes fraction, layout-independent
    frac = to_frac.transform(np.column_stack([xs, ys]))
    for i, (name, (fx, fy)) in enumerate(zip(names, frac, strict=True)):
        dx, dy = frac[:, 0] - fx, np.abs(frac[:, 1] - fy)
        crowded = ((dx > 0) & (dx < 0.25) & (dy < 0.04)).any() or fx > 0.8
        ax.annotate(
            name,
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(-5 if crowded else 5, 0),
            ha="right" if crowded else "left",
            va="center",
            fontsize=7,
            color="0.25",
        )


@style.styled
def figure2_right(
    summary: pd.DataFrame,
    snapshots: pd.DataFrame | None = None,
    paper_points: pd.DataFrame | None = None,
) -> Figure:
    """Fig. 2-right (Sec. 5.1): test perplexity vs computational budget (ops/timestep).

    Paper: Jozefowicz et al.'s LSTMs (final perplexity, solid; at 10 epochs where printed, dashed)
    and the ~4B-parameter MoE models at 10 epochs. This run: the `lm1b` sweep, one point per
    model (mean over seeds, a bar from the lowest to the highest seed where a model has >= 2
    runs), no-MoE baselines vs sparse MoE, each line through the best model at each ops/timestep,
    every model after the same number of training tokens (collect.at_common_tokens: the budget
    models' count, a snapshot of the others; runs with no evaluation there are left out).
    """
    pts = paper.figure2_right_series() if paper_points is None else paper_points
    fig, axes = style.new_figure(1, 2, (11.5, 4.6))
    ax_p, ax_r = axes[0]
    _paper_panel(ax_p, pts)
    snaps = snapshots if snapshots is not None else pd.DataFrame(columns=collect.SNAPSHOT_COLUMNS)
    _runs_panel(ax_r, *collect.at_common_tokens(summary, snaps, "lm1b"))
    return fig


def _paper_panel(ax_p, pts: pd.DataFrame) -> None:
    """The paper's LSTM and MoE lines (Table 7), the solid lines' points named."""
    for (line, metric), (label, ls, color) in _PAPER_LINES.items():
        part = pts[(pts["line"] == line) & (pts["metric"] == metric)].sort_values(
            "ops_per_timestep_M"
        )
        ax_p.plot(
            part["ops_per_timestep_M"],
            part["test_perplexity"],
            ls,
            marker="o",
            color=color,
            label=label,
            mfc="white" if ls == "--" else color,
        )
        if ls == "-":
            below = line.startswith("MoE")
            for _, r in part.iterrows():
                ax_p.annotate(
                    r["model"].rstrip("*"),
                    (r["ops_per_timestep_M"], r["test_perplexity"]),
                    textcoords="offset points",
                    xytext=(4, -11 if below else 4),
                    fontsize=7.5,
                )
    style.scale(ax_p, "x", pts["ops_per_timestep_M"])
    ax_p.set_xlim(pts["ops_per_timestep_M"].min() / 1.6, pts["ops_per_timestep_M"].max() * 8)
    ax_p.set(xlabel=style.OPS_LABEL, ylabel="test perplexity")
    ax_p.set_title("paper: 1B Word, Table 7")
    style.legend(ax_p)


def _runs_panel(ax_r, runs: pd.DataFrame, tokens) -> None:
    """The lm1b sweep's models after `tokens` training tokens: the families' points (seed bars)
    and, along a budget axis, each group's line through its best model per ops/timestep."""
    title = "this run: lm1b"
    if runs.empty:
        style.empty_panel(ax_r, title, f"{style.NOT_RUN}: no runs with sweep=lm1b")
        return
    m = collect.per_model(
        runs, ["ops_per_timestep", "test_perplexity"], spread=["test_perplexity"]
    ).assign(x=lambda d: d["ops_per_timestep"] / 1e6)
    for fam in collect.FAMILIES:
        part = m[m["family"] == fam]
        ax_r.plot(
            part["x"],
            part["test_perplexity"],
            style.FAMILY_MARKERS[fam],
            color=style.COLORS[fam],
            alpha=0.8,
            label=f"{fam} runs",
        )
    bars = style.seed_errorbars(ax_r, m, "x", "test_perplexity")
    ops = m["x"]
    matched = ops.max() < 1.5 * ops.min()  # no budget axis to draw lines along
    for group, fams, color in (
        ("no sparse MoE", ["baseline"], style.COLORS["LSTM"]),
        ("sparse MoE", ["flat MoE", "hierarchical MoE"], style.COLORS["MoE"]),
    ):
        part = m[m["family"].isin(fams)]
        best = part.groupby(part["x"].round(3))["test_perplexity"].min()
        if len(best) > 1 and not matched:
            ax_r.plot(
                best.index, best.to_numpy(), "-", color=color, label=f"{group}: best per budget"
            )
    style.scale(ax_r, "x", ops)
    ax_r.margins(x=0.3)
    _label_points(ax_r, ops.to_numpy(), m["test_perplexity"].to_numpy(), list(m["model"]))
    ax_r.set(
        xlabel=style.OPS_LABEL.replace(", log", "") if matched else style.OPS_LABEL,
        ylabel=f"test perplexity after {style.fmt_tokens(tokens)} tokens",
    )
    spread = "compute-matched, " if matched else ""
    seeds = f"\n(seed means; bars: {style.SEED_BARS})" if bars else ""
    ax_r.set_title(f"{title} ({spread}{ops.min():.3g}-{ops.max():.3g}M ops){seeds}")
    style.legend(ax_r)
