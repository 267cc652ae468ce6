"""The layer benchmark (moe_impl/cli/bench.py; the shrinking batch of Sec. 3.1): µs/token and the
ratio to the FLOP-matched dense FFN vs experts, with the peers' measurements (peers.csv) where the
configuration is the same.

Pure: frames in, a matplotlib Figure out.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, style
from moe_impl.bench.plot import PEER_STYLES  # the bench's own figure marks the peers alike


def _mode_title(df: pd.DataFrame, mode: str) -> str:
    r = df.iloc[0]
    if mode == "fixed_tokens":
        what = f"T={int(r['tokens']):,}"
    else:
        what = f"m={r['target_tokens_per_expert']:g}"
    return (
        f"this run: {style.TOKENS_MODES.get(mode, mode)} ({what}, d/h={int(r['d_model'])}/"
        f"{int(r['d_hidden'])}, {r['device']}, {int(r['threads'])} thr.)"
    )


@style.styled
def perf_scaling(bench: pd.DataFrame, peers: pd.DataFrame | None = None) -> Figure:
    """The layer benchmark (moe_impl/cli/bench.py; the shrinking batch of Sec. 3.1): µs per token
    (MoE solid, its FLOP-matched dense FFN dashed) and the MoE/dense ratio against experts, one
    column per tokens mode; the peers measured in this run (`bench --peers`, each against its own
    dense FFN) as gray lines, dotted where hierarchical; the published peers' measurements
    (peers.csv) as black markers where the configuration (kind, n, T, d, h, k, threads, CPU) equals
    ours (faded: not paired with a dense step)."""
    bench, run_peers = collect.split_bench(bench)
    modes = [
        m for m in style.TOKENS_MODES if not bench.empty and m in set(bench.get("tokens_mode", []))
    ]
    fig, axes = style.new_figure(2, max(len(modes), 1), (6.2 * max(len(modes), 1), 8))
    if not modes:
        style.empty_panel(
            axes[0, 0], "this run: layer benchmark", f"{style.NOT_RUN}: no bench.json"
        )
        style.empty_panel(axes[1, 0], "this run: ratio to dense", style.NOT_RUN)
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
            for ax, col in ((ax_t, "moe_us_per_token"), (ax_r, "ratio_median")):
                ax.plot(part["num_experts"], part[col], "-o", color=style.COLORS[fam], label=fam)
            ax_t.plot(
                part["num_experts"],
                part["dense_us_per_token"],
                "--",
                color=style.COLORS[fam],
                alpha=0.7,
                label=f"dense FFN matched to {kind}",
            )
        _draw_run_peers(ax_t, ax_r, run_peers[run_peers["tokens_mode"] == mode])
        peers_here = matched[matched["tokens_mode"] == mode]
        for impl, p in peers_here.groupby("implementation"):
            for paired, q in p.groupby("paired"):
                kw = {"color": "black", "ms": 8, "ls": "none", "mew": 1.4}
                if not paired:
                    kw["alpha"] = 0.5
                lab = f"{impl} (peers.csv, published)" + ("" if paired else " (under load)")
                marker = style.PEER_MARKERS.get(impl, "x")
                for ax, col in ((ax_t, "us_per_token"), (ax_r, "ratio_vs_dense")):
                    ax.plot(q["num_experts"], q[col], marker, label=lab, **kw)
        ax_r.axhline(1.0, color="0.5", lw=0.8, ls="--")
        for ax in (ax_t, ax_r):
            ax.set_xscale("log", base=2)
            style.sparse_log2_ticks(ax, df["num_experts"])
            style.scale(ax, "y", [y for line in ax.get_lines() for y in line.get_ydata()])
            ax.margins(y=0.12)
        skipped = len(df) - len(ok)
        ax_t.set_title(
            _mode_title(df, mode) + (f"\n{skipped} configuration(s) skipped" if skipped else "")
        )
        ax_t.set(ylabel="µs per token (fwd+bwd, log)")
        ax_r.set(xlabel=style.EXPERTS_LABEL, ylabel="MoE time / dense FFN time (log)")
        ax_r.set_title("this run: ratio to the FLOP-matched dense FFN")
    style.fig_legend(fig, axes, ncol=2 if axes.shape[1] == 1 else 4)  # one column of panels: 2 fit
    return fig


def _draw_run_peers(ax_t, ax_r, rows: pd.DataFrame) -> None:
    """The peers measured in this run: one gray line per implementation and kind."""
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    names = list(dict.fromkeys(ok["implementation"])) if not ok.empty else []
    for name, marker in zip(names, PEER_STYLES * len(names), strict=False):
        for kind, line in (("flat", "-"), ("hierarchical", ":")):
            part = ok[(ok["implementation"] == name) & (ok["kind"] == kind)]
            if part.empty:
                continue
            part = part.sort_values("num_experts")
            kw = {"color": "0.45", "marker": marker, "ls": line, "ms": 6, "mfc": "none"}
            label = f"{name} (this run)" if kind == "flat" else f"{name}, N-h (this run)"
            ax_t.plot(part["num_experts"], part["moe_us_per_token"], label=label, **kw)
            ax_r.plot(part["num_experts"], part["ratio_median"], label=label, **kw)
