"""What the figures share (analysis/fig_*.py): the seaborn theme, one colour per model family,
markers, axis labels, and the panel helpers (log scales with plain numbers, legends, "not run"
panels). `styled` applies the theme inside each figure function only, so nothing leaks into the
caller's matplotlib state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

PALETTE = sns.color_palette("colorblind")
COLORS = {
    "baseline": "0.45",
    "flat MoE": PALETTE[0],
    "hierarchical MoE": PALETTE[1],
    "LSTM": PALETTE[2],
    "MoE": PALETTE[4],
    "early": PALETTE[3],
    "late": PALETTE[0],
}
BASELINE_MARKERS = ["s", "D", "^", "v", "P", "X", "h"]
FAMILY_MARKERS = {"baseline": "s", "flat MoE": "o", "hierarchical MoE": "^"}
PEER_MARKERS = {
    "ref": "x",
    "ref_hier": "+",
    "davidmrau": "1",
    "lucidrains": "3",
    "lucidrains_hier": "4",
}
THEME = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.25),
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.85,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
}
PARAMS_LABEL = "parameters excl. embedding & softmax (millions, log)"
OPS_LABEL = "ops/timestep (millions of multiply-adds, log)"
EXPERTS_LABEL = "number of experts (log₂)"
NOT_RUN = "not run"
TOKENS_MODES = {
    "fixed_tokens": "fixed tokens per step",
    "fixed_tokens_per_expert": "fixed tokens/expert",
}


def styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a figure function under THEME (an rc context, undone when it returns)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(THEME):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(
    nrows: int, ncols: int, figsize: tuple[float, float], **kw
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def empty_panel(ax, title: str, why: str) -> None:
    """A panel that says what is missing instead of plotting nothing."""
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        why,
        ha="center",
        va="center",
        transform=ax.transAxes,
        wrap=True,
        fontsize=10,
        color="0.3",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _plain(v: float) -> str:
    if v >= 1:
        return f"{v:,.0f}" if abs(v - round(v)) < 1e-9 else f"{v:,.3g}"
    return f"{v:.2g}"


def scale(ax, axis: str, values, base: int = 10) -> None:
    """Log scale with plain-number labels (1,024 rather than 2^10; the minor ticks labelled too
    when the view spans little more than a decade); linear where the values span < 3x."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], float)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if v.size and v.max() < 3 * v.min():
        target.set_major_formatter(FuncFormatter(lambda x, _: _plain(x) if x > 0 else f"{x:g}"))
        return
    getattr(ax, f"set_{axis}scale")("log", base=base)
    target.set_major_formatter(FuncFormatter(lambda x, _: _plain(x)))

    def minor(x, _):
        lo, hi = sorted(target.get_view_interval())
        decades = np.log10(hi / lo) if lo > 0 else np.inf
        lead = int(f"{x:.0e}"[0]) if x > 0 else 0
        return (
            _plain(x) if lead in ((2, 3, 5) if decades < 1.3 else (2, 5)) and decades < 2.2 else ""
        )

    target.set_minor_formatter(FuncFormatter(minor))
    if base == 2:
        target.set_major_locator(LogLocator(base=2, numticks=20))
        target.set_minor_formatter(NullFormatter())


def legend(ax, below: bool = False, ncol: int = 1, **kw) -> None:
    """A legend inside (best free spot) or below the axes (never over the data)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False, **kw)
    else:
        ax.legend(loc="best", ncol=ncol, **kw)


def fig_legend(fig: Figure, axes, ncol: int) -> None:
    """One legend below all panels, each label once."""
    seen: dict[str, Artist] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, frameon=False
        )


def sparse_log2_ticks(ax, values) -> None:
    """x ticks at the expert counts present, every other one when crowded."""
    ticks = sorted({int(v) for v in values if v and v > 0})
    if len(ticks) > 8:
        ticks = ticks[::2]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:,}" for t in ticks], rotation=30 if len(ticks) > 5 else 0)
    ax.xaxis.set_minor_formatter(NullFormatter())


SEED_BARS = "min–max over seeds"


def seed_errorbars(ax, pts, x: str, y: str, color=None) -> bool:
    """Bars from `<y>_min` to `<y>_max` at the points of models with n_runs >= 2 (means over
    seeds at `y`), coloured by family unless `color`; True when any bar was drawn. No marker and
    no legend entry: the points are drawn by the caller."""
    lo, hi = f"{y}_min", f"{y}_max"
    if not {lo, hi, "n_runs"} <= set(pts.columns):
        return False
    many = pts[(pts["n_runs"] >= 2) & pts[lo].notna() & pts[hi].notna()]
    by = many["family"] if color is None and "family" in many else pd.Series(0, many.index)
    for fam, part in many.groupby(by, sort=False):
        ax.errorbar(
            part[x],
            part[y],
            yerr=[part[y] - part[lo], part[hi] - part[y]],
            fmt="none",
            ecolor=color or COLORS.get(fam, "0.3"),
            elinewidth=1.0,
            capsize=2.5,
            label="_nolegend_",
        )
    return not many.empty


def fmt_tokens(n: float) -> str:
    """A token count with thousands separators (20,480)."""
    return f"{n:,.0f}"
