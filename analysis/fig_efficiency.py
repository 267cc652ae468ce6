"""Computational efficiency (Sec. 5.1): throughput and MFU per device vs experts,
beside Tables 7/8's observed TFLOPS/GPU.

Pure: frames in, a matplotlib Figure out.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis import collect, style


def _paper_efficiency() -> pd.DataFrame:
    """Tables 7 and 8's ~8M-ops models with a TFLOPS/GPU value, no-MoE models at x = 1."""
    rows = []
    for table, label in (("table7", "Table 7"), ("table8", "Table 8")):
        w = collect.paper_models(table, ["tflops_per_gpu", "ops_per_timestep_M"])
        w = w[(w["ops_per_timestep_M"] < 12) & w["tflops_per_gpu"].notna()]
        rows.append(w.assign(table=label, x=w["num_experts"].clip(lower=1)))
    return pd.concat(rows, ignore_index=True)


@style.styled
def efficiency(summary: pd.DataFrame, bench: pd.DataFrame | None = None) -> Figure:
    """Computational efficiency (Sec. 5.1) against the number of experts.

    Paper: Tables 7 (filled) and 8 (hollow) observed TFLOPS/GPU (K40) of the ~8M-ops models
    (no-MoE baselines at n = 1). This run: achieved GFLOP/s per device of the training runs
    (lm1b filled, news100b hollow) and of the layer benchmark if given, and MFU; the MFU panel
    also shows the paper's TFLOPS/GPU over the K40's 4.29 TFLOPS peak, a like-for-like fraction.
    """
    fig, axes = style.new_figure(1, 3, (16, 5.4))
    ax_p, ax_t, ax_m = axes[0]
    pp = _paper_efficiency()
    for (table, fam), part in pp.groupby(["table", "family"], sort=False):
        part = part.sort_values("x")
        kw = {
            "marker": style.FAMILY_MARKERS[fam],
            "color": style.COLORS[fam],
            "ms": 6,
            "ls": "none" if fam == "baseline" else ("-" if table == "Table 7" else ":"),
            "mfc": style.COLORS[fam] if table == "Table 7" else "white",
        }
        ax_p.plot(part["x"], part["tflops_per_gpu"], label=f"paper {table}: {fam}", **kw)
        ax_m.plot(part["x"], part["tflops_per_gpu"] / collect.K40_PEAK_TFLOPS, alpha=0.4, **kw)
    ax_p.set(xlabel=style.EXPERTS_LABEL + "; no MoE at 1", ylabel="observed TFLOPS per GPU (K40)")
    ax_p.set_title("paper: Tables 7 and 8 (~8M ops/timestep)")
    ax_p.set_ylim(bottom=0)
    runs = collect.sweep(summary, "lm1b")
    runs = pd.concat([runs, collect.sweep(summary, "news100b")])
    runs = runs[runs["tflops_per_device"].notna()] if not runs.empty else runs
    if bench is not None:
        bench = collect.split_bench(bench)[0]  # our layer's rows, not the peers'
    has_bench = bench is not None and not bench.empty and "moe_gflops" in bench
    xs = list(pp["x"])
    if runs.empty and not has_bench:
        style.empty_panel(
            ax_t, "this run: throughput", f"{style.NOT_RUN}: no lm1b/news100b runs, no bench.json"
        )
        ax_m.set_title("MFU: paper (TFLOPS/GPU ÷ 4.29); this run not run")
    for (sweep_name, fam), part in [] if runs.empty else runs.groupby(["sweep", "family"]):
        x = part["num_experts"].clip(lower=1)
        xs += list(x)
        kw = {
            "marker": style.FAMILY_MARKERS[fam],
            "ls": "none",
            "color": style.COLORS[fam],
            "ms": 6,
            "mfc": "white" if sweep_name == "news100b" else style.COLORS[fam],
        }
        ax_t.plot(x, part["tflops_per_device"] * 1e3, label=f"this run {sweep_name}: {fam}", **kw)
        ax_m.plot(x, part["mfu"], **kw)
    if has_bench:
        assert bench is not None  # has_bench
        ok = bench[bench["status"] == "ok"] if "status" in bench else bench
        for (mode, part), ls in zip(ok.groupby("tokens_mode"), ("--", "-."), strict=False):
            part = part.sort_values("num_experts")
            xs += list(part["num_experts"])
            kw = {"ls": ls, "color": "0.25", "lw": 1, "marker": "."}
            ax_t.plot(
                part["num_experts"],
                part["moe_gflops"],
                label=f"layer benchmark, {style.TOKENS_MODES.get(mode, mode)}",
                **kw,
            )
            ax_m.plot(part["num_experts"], part["mfu"], **kw)
    if not (runs.empty and not has_bench):
        devices = sorted(set(runs["device_name"].dropna())) if "device_name" in runs else []
        ax_t.set_title("this run: throughput" + (f", {devices[0]}" if len(devices) == 1 else ""))
        ax_t.set(
            xlabel=style.EXPERTS_LABEL + "; no MoE at 1", ylabel="achieved GFLOP/s per device (log)"
        )
        style.scale(ax_t, "y", [y for line in ax_t.get_lines() for y in line.get_ydata()])
        ax_t.set_xscale("log", base=2)
        style.sparse_log2_ticks(ax_t, xs)
        ax_m.set_title("MFU: this run; paper faded (TFLOPS/GPU ÷ 4.29)")
    ax_m.set(xlabel=style.EXPERTS_LABEL + "; no MoE at 1", ylabel="MFU (fraction of device peak)")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_p, ax_m):
        ax.set_xscale("log", base=2)
        style.sparse_log2_ticks(ax, xs)
    style.fig_legend(fig, axes, ncol=4)
    return fig
