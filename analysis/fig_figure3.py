"""Fig. 3 (Sec. 5.2): test perplexity vs parameters after N and 10N tokens, and the gap (Table 8).

Pure: frames in, a matplotlib Figure out. The paper's Table 8 and our `news100b` sweep sit in
separate columns (a perplexity on the synthetic corpus is not one on 100B-word news).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, paper, style


def _gap_lines(ax, pts: pd.DataFrame, early: str, late: str, labels: tuple[str, str]) -> None:
    """Two perplexity lines vs params and a thin segment at each x marking the gap."""
    pts = pts.sort_values("x")
    for col, label, key in ((early, labels[0], "early"), (late, labels[1], "late")):
        ax.plot(pts["x"], pts[col], "-o", color=style.COLORS[key], label=label, ms=5)
    ax.vlines(pts["x"], pts[late], pts[early], colors="0.6", lw=0.8, ls=":", label="gap")
    for col, key in ((early, "early"), (late, "late")):
        style.seed_errorbars(ax, pts, "x", col, color=style.COLORS[key])
    base = pts[pts["family"] == "baseline"]
    if not base.empty:
        ax.plot(
            base["x"],
            base[early],
            "s",
            color=style.COLORS["baseline"],
            ms=7,
            ls="none",
            label=f"{base['model'].iloc[0]} (baseline)",
        )
        ax.plot(base["x"], base[late], "s", color=style.COLORS["baseline"], ms=7, ls="none")
    style.scale(ax, "x", pts["x"])
    ax.margins(x=0.08)
    style.legend(ax)


def _gap_panel(ax, pts: pd.DataFrame, ylabel: str) -> None:
    pts = pts.sort_values("x")
    ax.plot(pts["x"], pts["gap"], "-o", color="0.3", ms=4)
    style.seed_errorbars(ax, pts, "x", "gap", color="0.3")
    for _, r in pts.iterrows():
        text = f"{r['gap']:.0f}" if abs(r["gap"]) >= 100 else f"{r['gap']:.1f}"
        ax.annotate(
            text,
            (r["x"], r["gap"]),
            textcoords="offset points",
            xytext=(-3, 4),
            ha="right",
            fontsize=7.5,
        )
    style.scale(ax, "x", pts["x"])
    ax.margins(x=0.08, y=0.3)
    ax.set(xlabel=style.PARAMS_LABEL, ylabel=ylabel)


@style.styled
def figure3(summary: pd.DataFrame, snapshots: pd.DataFrame) -> Figure:
    """Fig. 3 (Sec. 5.2): test perplexity vs capacity after N and 10N tokens, and the gap.

    Paper: Table 8 after 10B and 100B words (4xLSTM-512 baseline marked). This run: the
    `news100b` sweep, its earliest snapshot and its final evaluation, means over seeds (a bar
    from the lowest to the highest seed where a model has >= 2 runs). Bottom row: gap = early -
    late perplexity per model (the paper's gap is not monotonic: analysis/paper_data/README.md).
    """
    g = paper.figure3_gap().rename(columns={"params_excl_embedding_softmax_M": "x"})
    g["family"] = np.where(g["model"] == paper.FIGURE3_BASELINE, "baseline", "MoE")
    fig, axes = style.new_figure(2, 2, (11.5, 7.2), height_ratios=(3, 2), sharex="col")
    _gap_lines(
        axes[0, 0],
        g,
        "ppl_10B_words",
        "ppl_100B_words",
        ("after 10B words (.1 epochs)", "after 100B words (1 epoch)"),
    )
    axes[0, 0].set(ylabel="test perplexity")
    axes[0, 0].set_title("paper: 100B-word news, Table 8 (~8M ops/timestep)")
    _gap_panel(axes[1, 0], g, "gap: 10B − 100B words")
    ours = collect.early_late(summary, snapshots, "news100b")
    title = "this run: sweep news100b"
    if ours.empty:
        style.empty_panel(
            axes[0, 1], title, f"{style.NOT_RUN}: no news100b run with a snapshot before its end"
        )
        style.empty_panel(axes[1, 1], "this run: gap", style.NOT_RUN)
        return fig
    m = collect.early_late_per_model(ours, spread=["early_perplexity", "late_perplexity", "gap"])
    if (m["n_runs"] >= 2).any():
        title += f"\n(seed means; bars: {style.SEED_BARS})"
    m["x"] = m["params_excl_embedding_softmax"] / 1e6
    n_early, n_late = sorted(set(ours["early_tokens"])), sorted(set(ours["late_tokens"]))
    early = "after " + "/".join(map(style.fmt_tokens, n_early)) + " tokens (N)"
    ratio = n_late[0] / n_early[0]
    late = "after " + "/".join(map(style.fmt_tokens, n_late)) + f" tokens ({ratio:.3g}N)"
    _gap_lines(axes[0, 1], m, "early_perplexity", "late_perplexity", (early, late))
    style.scale(axes[0, 1], "y", [*m["early_perplexity"], *m["late_perplexity"]])
    log = axes[0, 1].get_yscale() == "log"
    axes[0, 1].set(ylabel="test perplexity" + (" (log)" if log else ""))
    if log:  # few tick labels on a log axis: print the values
        for col, dy in (("early_perplexity", 5), ("late_perplexity", -11)):
            for x, y in zip(m["x"], m[col], strict=True):
                axes[0, 1].annotate(
                    f"{y:.4g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, dy),
                    ha="center",
                    fontsize=7,
                )
    axes[0, 1].set_title(title)
    _gap_panel(axes[1, 1], m, "gap: N − final tokens")
    return fig
