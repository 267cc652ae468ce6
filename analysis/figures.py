"""The paper's figures from our runs, beside the paper's own numbers (paper.md §2-3).

Pure functions, frames in and a matplotlib Figure out (no files; analysis/io.py saves them):
  figure2_left    Fig. 2-left: test perplexity vs parameters excl. embedding and softmax (Table 7)
  figure2_right   Fig. 2-right: test perplexity vs ops/timestep, LSTM line vs MoE line (Table 7)
  figure3         Fig. 3: test perplexity vs parameters after N and 10N tokens, and the gap (Table 8)
  table6_balance  Table 6: CV(importance), CV(load), max/mean load and perplexity per loss
                  weighting, and the per-expert load with and without the losses (App. A)
  perf_scaling    the layer benchmark: µs/token and ratio to the FLOP-matched dense FFN vs experts,
                  with peers.md's measurements where the configuration is the same
  efficiency      throughput and MFU per device vs experts, beside Tables 7/8's TFLOPS/GPU (§5.1)
The paper and our runs never share an axis where the scales differ (a perplexity on the synthetic
corpus is not one on 1B Word): each figure has "paper: ..." and "this run: ..." panels. Styling
(one seaborn theme, one colour per model family) is applied inside each function, so nothing
leaks into the caller's matplotlib state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis import collect, paper
from moe_impl.presets import ALL_PRESETS

_PALETTE = sns.color_palette("colorblind")
COLORS = {
    "baseline": "0.45",
    "flat MoE": _PALETTE[0],
    "hierarchical MoE": _PALETTE[1],
    "LSTM": _PALETTE[2],
    "MoE": _PALETTE[4],
    "early": _PALETTE[3],
    "late": _PALETTE[0],
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
STYLE = {
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


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(
    nrows: int, ncols: int, figsize: tuple[float, float], **kw
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _empty(ax, title: str, why: str) -> None:
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


def _scale(ax, axis: str, values, base: int = 10) -> None:
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


def _legend(ax, below: bool = False, ncol: int = 1, **kw) -> None:
    """A legend inside (best free spot) or below the axes (never over the data)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False, **kw)
    else:
        ax.legend(loc="best", ncol=ncol, **kw)


def _sparse_log2_ticks(ax, values) -> None:
    """x ticks at the expert counts present, every other one when crowded."""
    ticks = sorted({int(v) for v in values if v and v > 0})
    if len(ticks) > 8:
        ticks = ticks[::2]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:,}" for t in ticks], rotation=30 if len(ticks) > 5 else 0)
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def _tokens(n: float) -> str:
    return f"{n:,.0f}"


def _params_panel(ax, pts: pd.DataFrame) -> None:
    """Figure 2-left / 3 style: baselines as distinct grey markers, flat and hierarchical MoE as
    lines with the expert count beside each point. pts: family, model, num_experts, x, y.

    Baselines share (nearly) one x, so they are dodged sideways by up to ±10% of x (a log axis:
    a small, constant visual offset) to keep every marker visible."""
    base = pts[pts["family"] == "baseline"]
    dodge = np.linspace(-0.1, 0.1, len(base)) if len(base) > 1 else [0.0]
    for i, (_, r) in enumerate(base.iterrows()):
        ax.plot(
            r["x"] * (1 + dodge[i]),
            r["y"],
            BASELINE_MARKERS[i % len(BASELINE_MARKERS)],
            ms=7,
            color=COLORS["baseline"],
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
            part["x"], part["y"], "-" + FAMILY_MARKERS[fam], color=COLORS[fam], ms=6, label=label
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
                color=COLORS[fam],
            )
    _scale(ax, "x", pts["x"])
    ax.margins(x=0.08, y=0.1)
    _legend(ax, title="experts beside points", title_fontsize=7.5)


def _ours(summary: pd.DataFrame, sweep: str, values: list[str]) -> pd.DataFrame:
    return collect.per_model(collect.sweep(summary, sweep), values)


@_styled
def figure2_left(summary: pd.DataFrame, paper_points: pd.DataFrame | None = None) -> Figure:
    """Fig. 2-left (paper.md §3): test perplexity vs capacity at ~constant ops/timestep.

    Left panel: the paper's Table 7 models after 10 epochs; right: our `lm1b` sweep's runs (mean
    over seeds), with the flat and hierarchical MoE lines and the compute-matched baselines.
    """
    pts = paper.figure2_left_series() if paper_points is None else paper_points
    pts = pts.assign(
        family=pts["series"],
        num_experts=[ALL_PRESETS[p].num_experts for p in pts["preset"]],
        x=pts["params_excl_embedding_softmax_M"],
        y=pts["test_perplexity_10_epochs"],
    )
    fig, axes = _figure(1, 2, (11.5, 4.6))
    ax_p, ax_r = axes[0]
    _params_panel(ax_p, pts)
    ax_p.set(xlabel=PARAMS_LABEL, ylabel="test perplexity after 10 epochs")
    ax_p.set_title("paper: 1B Word, Table 7 (~8M ops/timestep)")
    ours = _ours(
        summary,
        "lm1b",
        ["params_excl_embedding_softmax", "test_perplexity", "ops_per_timestep", "train_tokens"],
    )
    title = "this run: sweep lm1b"
    if ours.empty:
        _empty(ax_r, title, f"{NOT_RUN}: no runs with sweep=lm1b")
        return fig
    ops = ours["ops_per_timestep"] / 1e6
    _params_panel(
        ax_r, ours.assign(x=ours["params_excl_embedding_softmax"] / 1e6, y=ours["test_perplexity"])
    )
    ax_r.set(
        xlabel=PARAMS_LABEL,
        ylabel=f"test perplexity after {_tokens(ours['train_tokens'].max())} tokens",
    )
    ax_r.set_title(f"{title} ({ops.min():.3g}-{ops.max():.3g}M ops/timestep)")
    return fig


@_styled
def figure2_right(summary: pd.DataFrame, paper_points: pd.DataFrame | None = None) -> Figure:
    """Fig. 2-right (paper.md §3): test perplexity vs computational budget (ops/timestep).

    Paper: Jozefowicz et al.'s LSTMs (final perplexity, solid; at 10 epochs where printed, dashed)
    and the ~4B-parameter MoE models at 10 epochs. This run: the `lm1b` sweep, no-MoE baselines
    vs sparse MoE, each line through the best run at each ops/timestep.
    """
    pts = paper.figure2_right_series() if paper_points is None else paper_points
    fig, axes = _figure(1, 2, (11.5, 4.6))
    ax_p, ax_r = axes[0]
    styles = {
        ("LSTM (Jozefowicz et al.)", "test_perplexity_final"): (
            "LSTM (Jozefowicz et al.), final",
            "-",
            COLORS["LSTM"],
        ),
        ("LSTM (Jozefowicz et al.)", "test_perplexity_10_epochs"): (
            "LSTM, at 10 epochs",
            "--",
            COLORS["LSTM"],
        ),
        ("MoE (~4B params)", "test_perplexity_10_epochs"): (
            "MoE (~4B params), 10 epochs",
            "-",
            COLORS["MoE"],
        ),
    }
    for (line, metric), (label, ls, color) in styles.items():
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
    _scale(ax_p, "x", pts["ops_per_timestep_M"])
    ax_p.set_xlim(pts["ops_per_timestep_M"].min() / 1.6, pts["ops_per_timestep_M"].max() * 8)
    ax_p.set(xlabel=OPS_LABEL, ylabel="test perplexity")
    ax_p.set_title("paper: 1B Word, Table 7")
    _legend(ax_p)
    runs = collect.sweep(summary, "lm1b")
    title = "this run: lm1b"
    if runs.empty:
        _empty(ax_r, title, f"{NOT_RUN}: no runs with sweep=lm1b")
        return fig
    for fam in collect.FAMILIES:
        part = runs[runs["family"] == fam]
        ax_r.plot(
            part["ops_per_timestep"] / 1e6,
            part["test_perplexity"],
            FAMILY_MARKERS[fam],
            color=COLORS[fam],
            alpha=0.8,
            label=f"{fam} runs",
        )
    ops = runs["ops_per_timestep"] / 1e6
    matched = ops.max() < 1.5 * ops.min()  # no budget axis to draw lines along
    for group, fams, color in (
        ("no sparse MoE", ["baseline"], COLORS["LSTM"]),
        ("sparse MoE", ["flat MoE", "hierarchical MoE"], COLORS["MoE"]),
    ):
        part = runs[runs["family"].isin(fams)]
        best = part.groupby((part["ops_per_timestep"] / 1e6).round(3))["test_perplexity"].min()
        if len(best) > 1 and not matched:
            ax_r.plot(
                best.index, best.to_numpy(), "-", color=color, label=f"{group}: best per budget"
            )
    _scale(ax_r, "x", ops)
    ax_r.margins(x=0.3)
    _label_points(ax_r, ops.to_numpy(), runs["test_perplexity"].to_numpy(), list(runs["model"]))
    ax_r.set(
        xlabel=OPS_LABEL.replace(", log", "") if matched else OPS_LABEL,
        ylabel=f"test perplexity after {_tokens(runs['train_tokens'].max())} tokens",
    )
    spread = "compute-matched, " if matched else ""
    ax_r.set_title(f"{title} ({spread}{ops.min():.3g}-{ops.max():.3g}M ops)")
    _legend(ax_r)
    return fig


def _gap_lines(ax, pts: pd.DataFrame, early: str, late: str, labels: tuple[str, str]) -> None:
    """Two perplexity lines vs params and a thin segment at each x marking the gap."""
    pts = pts.sort_values("x")
    for col, label, key in ((early, labels[0], "early"), (late, labels[1], "late")):
        ax.plot(pts["x"], pts[col], "-o", color=COLORS[key], label=label, ms=5)
    ax.vlines(pts["x"], pts[late], pts[early], colors="0.6", lw=0.8, ls=":", label="gap")
    base = pts[pts["family"] == "baseline"]
    if not base.empty:
        ax.plot(
            base["x"],
            base[early],
            "s",
            color=COLORS["baseline"],
            ms=7,
            ls="none",
            label=f"{base['model'].iloc[0]} (baseline)",
        )
        ax.plot(base["x"], base[late], "s", color=COLORS["baseline"], ms=7, ls="none")
    _scale(ax, "x", pts["x"])
    ax.margins(x=0.08)
    _legend(ax)


def _gap_panel(ax, pts: pd.DataFrame, ylabel: str) -> None:
    pts = pts.sort_values("x")
    ax.plot(pts["x"], pts["gap"], "-o", color="0.3", ms=4)
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
    _scale(ax, "x", pts["x"])
    ax.margins(x=0.08, y=0.3)
    ax.set(xlabel=PARAMS_LABEL, ylabel=ylabel)


@_styled
def figure3(summary: pd.DataFrame, snapshots: pd.DataFrame) -> Figure:
    """Fig. 3 (paper.md §3): test perplexity vs capacity after N and 10N tokens, and the gap.

    Paper: Table 8 after 10B and 100B words (4xLSTM-512 baseline marked). This run: the
    `news100b` sweep, its earliest snapshot and its final evaluation. Bottom row: gap = early -
    late perplexity per model (the paper's gap is not monotonic: analysis/paper_data/README.md).
    """
    g = paper.figure3_gap().rename(columns={"params_excl_embedding_softmax_M": "x"})
    g["family"] = np.where(g["model"] == paper.FIGURE3_BASELINE, "baseline", "MoE")
    fig, axes = _figure(2, 2, (11.5, 7.2), height_ratios=(3, 2), sharex="col")
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
        _empty(axes[0, 1], title, f"{NOT_RUN}: no news100b run with a snapshot before its end")
        _empty(axes[1, 1], "this run: gap", NOT_RUN)
        return fig
    m = collect.per_model(
        ours,
        [
            "params_excl_embedding_softmax",
            "early_tokens",
            "early_perplexity",
            "late_tokens",
            "late_perplexity",
            "gap",
        ],
    )
    m["x"] = m["params_excl_embedding_softmax"] / 1e6
    n_early, n_late = sorted(set(ours["early_tokens"])), sorted(set(ours["late_tokens"]))
    early = "after " + "/".join(map(_tokens, n_early)) + " tokens (N)"
    ratio = n_late[0] / n_early[0]
    late = "after " + "/".join(map(_tokens, n_late)) + f" tokens ({ratio:.3g}N)"
    _gap_lines(axes[0, 1], m, "early_perplexity", "late_perplexity", (early, late))
    _scale(axes[0, 1], "y", [*m["early_perplexity"], *m["late_perplexity"]])
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


def _setting(wi: float, wl: float) -> str:
    return f"{wi:g} / {wl:g}"


def _balance_bars(ax, df: pd.DataFrame) -> None:
    """Grouped bars per loss weighting: CV(importance), CV(load), max/mean load (log y)."""
    metrics = (
        ("cv_importance", "CV(Importance)"),
        ("cv_load", "CV(Load)"),
        ("max_over_mean_load", "max(Load)/mean(Load)"),
    )
    x = np.arange(len(df))
    for i, (col, label) in enumerate(metrics):
        ax.bar(
            x + (i - 1) * 0.27, df[col].clip(lower=1e-3), width=0.27, label=label, color=_PALETTE[i]
        )
    values = df[[c for c, _ in metrics]].to_numpy(float).ravel()
    _scale(ax, "y", [*values, values.max() * 30])  # always log: CVs and max/mean differ 100x
    top = values.max()
    ax.set_ylim(top=top * 12)  # headroom for the legend
    ax.set_xticks(
        x,
        [_setting(a, b) for a, b in zip(df["w_importance"], df["w_load"], strict=True)],
        rotation=25,
    )
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
    ax.set_xticks(
        x,
        [_setting(a, b) for a, b in zip(df["w_importance"], df["w_load"], strict=True)],
        rotation=25,
    )
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


@_styled
def table6_balance(summary: pd.DataFrame, loads: pd.DataFrame) -> Figure:
    """Table 6 (App. A, paper.md §1.3): the balancing-loss ablation, paper vs our `balance` sweep.

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
    fig, axes = _figure(2, 3, (15, 7.6))
    _balance_bars(axes[0, 0], pw)
    axes[0, 0].set_title("paper: Table 6, MoE-256 on 1B Word")
    _ppl_bars(axes[1, 0], pw, COLORS["baseline"])
    axes[1, 0].set_title("paper: test perplexity after 10 epochs")
    ours = collect.balance(summary)
    if ours.empty:
        _empty(axes[0, 1], "this run: sweep balance", f"{NOT_RUN}: no runs with sweep=balance")
        _empty(axes[1, 1], "this run: test perplexity", NOT_RUN)
    else:
        _balance_bars(axes[0, 1], ours)
        model = collect.sweep(summary, "balance")["model"].iloc[0]
        axes[0, 1].set_title(f"this run: sweep balance ({model})")
        _ppl_bars(axes[1, 1], ours, COLORS["flat MoE"])
        axes[1, 1].set_title("this run: test perplexity")
    pair = load_pair(summary, loads)
    if not pair:
        why = f"{NOT_RUN}: no balance run with expert_load.json"
        _empty(axes[0, 2], "this run: per-expert load", why)
        _empty(axes[1, 2], "this run: per-expert load, sorted", why)
        return fig
    top = max(v.max() for v in pair.values())
    bins = np.linspace(0, top * 1.02, 31)
    colors = [COLORS["early"], COLORS["late"]]
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


_MODES = {"fixed_tokens": "fixed tokens per step", "fixed_tokens_per_expert": "fixed tokens/expert"}


def _mode_title(df: pd.DataFrame, mode: str) -> str:
    r = df.iloc[0]
    if mode == "fixed_tokens":
        what = f"T={int(r['tokens']):,}"
    else:
        what = f"m={r['target_tokens_per_expert']:g}"
    return (
        f"this run: {_MODES.get(mode, mode)} ({what}, d/h={int(r['d_model'])}/"
        f"{int(r['d_hidden'])}, {r['device']}, {int(r['threads'])} thr.)"
    )


@_styled
def perf_scaling(bench: pd.DataFrame, peers: pd.DataFrame | None = None) -> Figure:
    """The layer benchmark (moe_impl/bench.py; paper.md §4.4's shrinking batch): µs per token
    (MoE solid, its FLOP-matched dense FFN dashed) and the MoE/dense ratio against experts, one
    column per tokens mode; peers.md's measurements as black markers where the configuration
    (kind, n, T, d, h, k, threads, CPU) equals ours (hollow: not paired with a dense step)."""
    modes = [m for m in _MODES if not bench.empty and m in set(bench.get("tokens_mode", []))]
    fig, axes = _figure(2, max(len(modes), 1), (6.2 * max(len(modes), 1), 8))
    if not modes:
        _empty(axes[0, 0], "this run: layer benchmark", f"{NOT_RUN}: no bench.json")
        _empty(axes[1, 0], "this run: ratio to dense", NOT_RUN)
        return fig
    matched = collect.match_peers(bench, peers)
    for j, mode in enumerate(modes):
        df = bench[bench["tokens_mode"] == mode]
        ok = df[df["status"] == "ok"] if "status" in df else df
        ax_t, ax_r = axes[0, j], axes[1, j]
        for kind, fam in (("flat", "flat MoE"), ("hierarchical", "hierarchical MoE")):
            part = ok[ok["kind"] == kind].sort_values("num_experts")
            if part.empty:
                continue
            ax_t.plot(
                part["num_experts"],
                part["moe_us_per_token"],
                "-o",
                color=COLORS[fam],
                label=f"{fam}",
            )
            ax_t.plot(
                part["num_experts"],
                part["dense_us_per_token"],
                "--",
                color=COLORS[fam],
                alpha=0.7,
                label=f"dense FFN matched to {kind}",
            )
            ax_r.plot(
                part["num_experts"], part["ratio_median"], "-o", color=COLORS[fam], label=f"{fam}"
            )
        peers_here = matched[matched["tokens_mode"] == mode]
        for impl, p in peers_here.groupby("implementation"):
            for paired, q in p.groupby("paired"):
                kw = {"color": "black", "ms": 8, "ls": "none", "mew": 1.4}
                if not paired:
                    kw["alpha"] = 0.5
                lab = f"peers.md: {impl}" + ("" if paired else " (under load)")
                ax_t.plot(
                    q["num_experts"],
                    q["us_per_token"],
                    PEER_MARKERS.get(impl, "x"),
                    label=lab,
                    **kw,
                )
                ax_r.plot(
                    q["num_experts"],
                    q["ratio_vs_dense"],
                    PEER_MARKERS.get(impl, "x"),
                    label=lab,
                    **kw,
                )
        ax_r.axhline(1.0, color="0.5", lw=0.8, ls="--")
        for ax in (ax_t, ax_r):
            ax.set_xscale("log", base=2)
            _sparse_log2_ticks(ax, df["num_experts"])
            _scale(ax, "y", [y for line in ax.get_lines() for y in line.get_ydata()])
            ax.margins(y=0.12)
        skipped = len(df) - len(ok)
        ax_t.set_title(
            _mode_title(df, mode) + (f"\n{skipped} configuration(s) skipped" if skipped else "")
        )
        ax_t.set(ylabel="µs per token (fwd+bwd, log)")
        ax_r.set(xlabel=EXPERTS_LABEL, ylabel="MoE time / dense FFN time (log)")
        ax_r.set_title("this run: ratio to the FLOP-matched dense FFN")
    _fig_legend(fig, axes, ncol=4)
    return fig


def _fig_legend(fig: Figure, axes, ncol: int) -> None:
    """One legend below all panels, each label once."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, frameon=False
        )


def _paper_efficiency() -> pd.DataFrame:
    """Tables 7 and 8's ~8M-ops models with a TFLOPS/GPU value, no-MoE models at x = 1."""
    rows = []
    for table, label in (("table7", "Table 7"), ("table8", "Table 8")):
        w = collect.paper_models(table, ["tflops_per_gpu", "ops_per_timestep_M"])
        w = w[(w["ops_per_timestep_M"] < 12) & w["tflops_per_gpu"].notna()]
        rows.append(w.assign(table=label, x=w["num_experts"].clip(lower=1)))
    return pd.concat(rows, ignore_index=True)


@_styled
def efficiency(summary: pd.DataFrame, bench: pd.DataFrame | None = None) -> Figure:
    """Computational efficiency (Sec. 5.1, paper.md §4.2) against the number of experts.

    Paper: Tables 7 (filled) and 8 (hollow) observed TFLOPS/GPU (K40) of the ~8M-ops models
    (no-MoE baselines at n = 1). This run: achieved GFLOP/s per device of the training runs
    (lm1b filled, news100b hollow) and of the layer benchmark if given, and MFU; the MFU panel
    also shows the paper's TFLOPS/GPU over the K40's 4.29 TFLOPS peak, a like-for-like fraction.
    """
    fig, axes = _figure(1, 3, (16, 5.4))
    ax_p, ax_t, ax_m = axes[0]
    pp = _paper_efficiency()
    for (table, fam), part in pp.groupby(["table", "family"], sort=False):
        part = part.sort_values("x")
        kw = {
            "marker": FAMILY_MARKERS[fam],
            "color": COLORS[fam],
            "ms": 6,
            "ls": "none" if fam == "baseline" else ("-" if table == "Table 7" else ":"),
            "mfc": COLORS[fam] if table == "Table 7" else "white",
        }
        ax_p.plot(part["x"], part["tflops_per_gpu"], label=f"paper {table}: {fam}", **kw)
        ax_m.plot(part["x"], part["tflops_per_gpu"] / collect.K40_PEAK_TFLOPS, alpha=0.4, **kw)
    ax_p.set(xlabel=EXPERTS_LABEL + "; no MoE at 1", ylabel="observed TFLOPS per GPU (K40)")
    ax_p.set_title("paper: Tables 7 and 8 (~8M ops/timestep)")
    ax_p.set_ylim(bottom=0)
    runs = collect.sweep(summary, "lm1b")
    runs = pd.concat([runs, collect.sweep(summary, "news100b")])
    runs = runs[runs["tflops_per_device"].notna()] if not runs.empty else runs
    has_bench = bench is not None and not bench.empty and "moe_gflops" in bench
    xs = list(pp["x"])
    if runs.empty and not has_bench:
        _empty(ax_t, "this run: throughput", f"{NOT_RUN}: no lm1b/news100b runs, no bench.json")
        ax_m.set_title("MFU: paper (TFLOPS/GPU ÷ 4.29); this run not run")
    for (sweep_name, fam), part in [] if runs.empty else runs.groupby(["sweep", "family"]):
        x = part["num_experts"].clip(lower=1)
        xs += list(x)
        kw = {
            "marker": FAMILY_MARKERS[fam],
            "ls": "none",
            "color": COLORS[fam],
            "ms": 6,
            "mfc": "white" if sweep_name == "news100b" else COLORS[fam],
        }
        ax_t.plot(x, part["tflops_per_device"] * 1e3, label=f"this run {sweep_name}: {fam}", **kw)
        ax_m.plot(x, part["mfu"], **kw)
    if has_bench:
        ok = bench[bench["status"] == "ok"] if "status" in bench else bench
        for (mode, part), ls in zip(ok.groupby("tokens_mode"), ("--", "-."), strict=False):
            part = part.sort_values("num_experts")
            xs += list(part["num_experts"])
            kw = {"ls": ls, "color": "0.25", "lw": 1, "marker": "."}
            ax_t.plot(
                part["num_experts"],
                part["moe_gflops"],
                label=f"layer benchmark, {_MODES.get(mode, mode)}",
                **kw,
            )
            ax_m.plot(part["num_experts"], part["mfu"], **kw)
    if not (runs.empty and not has_bench):
        devices = sorted(set(runs["device_name"].dropna())) if "device_name" in runs else []
        ax_t.set_title("this run: throughput" + (f", {devices[0]}" if len(devices) == 1 else ""))
        ax_t.set(xlabel=EXPERTS_LABEL + "; no MoE at 1", ylabel="achieved GFLOP/s per device (log)")
        _scale(ax_t, "y", [y for line in ax_t.get_lines() for y in line.get_ydata()])
        ax_t.set_xscale("log", base=2)
        _sparse_log2_ticks(ax_t, xs)
        ax_m.set_title("MFU: this run; paper faded (TFLOPS/GPU ÷ 4.29)")
    ax_m.set(xlabel=EXPERTS_LABEL + "; no MoE at 1", ylabel="MFU (fraction of device peak)")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_p, ax_m):
        ax.set_xscale("log", base=2)
        _sparse_log2_ticks(ax, xs)
    _fig_legend(fig, axes, ncol=4)
    return fig


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
