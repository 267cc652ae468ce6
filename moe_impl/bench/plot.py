"""Reporting for `python -m moe_impl bench` (bench.py): the aligned text table, the JSON / CSV
files and the two-panel figure (µs per token, and ratio to the FLOP-matched dense FFN, against the
number of experts). Rows are plain dicts, one per configuration; NaN marks what was not measured.
Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from moe_impl.bench.spec import OURS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (header, row key, format) of the text table; two keys give "a / b" cells ("axb" for the shape).
COLUMNS = (
    ("config", "config", "{}"),
    ("implementation", "implementation", "{}"),
    ("n", "num_experts", "{:d}"),
    ("a x b", ("num_groups", "group_size"), "{:d}"),
    ("tokens", "tokens", "{:d}"),
    ("tok/exp", "tokens_per_expert", "{:.4g}"),
    ("tok/active", "tokens_per_active_expert", "{:.4g}"),
    ("MoE ms med/min", ("moe_ms_median", "moe_ms_min"), "{:.1f}"),
    ("dense ms med/min", ("dense_ms_median", "dense_ms_min"), "{:.1f}"),
    ("us/tok MoE", "moe_us_per_token", "{:.2f}"),
    ("us/tok dense", "dense_us_per_token", "{:.2f}"),
    ("ratio med/min", ("ratio_median", "ratio_min"), "{:.2f}"),
    ("GFLOP/s", "moe_gflops", "{:.1f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("mem MB", "peak_mem_mb", "{:.0f}"),
    ("CV load", "cv_load", "{:.3f}"),
    ("CV count", "cv_tokens_per_expert", "{:.3f}"),
    ("max/mean", "max_over_mean_load", "{:.2f}"),
    ("params", "params", "{:,d}"),
    ("compile s", "compile_s", "{:.1f}"),
)


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(row: dict, key: str | tuple[str, str], fmt: str) -> str:
    keys = (key,) if isinstance(key, str) else key
    values = [row.get(k) for k in keys]
    if any(is_missing(v) for v in values):
        return "-"
    return ("x" if key == ("num_groups", "group_size") else " / ").join(map(fmt.format, values))


def describe(rows: list[dict]) -> str:
    """One line of the settings shared by the rows, used as table header and figure title."""
    r = rows[0]
    if r["tokens_mode"] == "fixed_tokens":
        mode = f"fixed tokens per step T={r['tokens']}"
    else:
        m, cap = r["target_tokens_per_expert"], r["max_tokens"]
        mode = f"fixed tokens per expert m={m:g} (T = ceil(m·n/k) <= {cap})"
    opt = ", SGD step" if r["optimizer"] else ""
    opt += ", routing and combine compiled (--compile)" if r.get("compile") else ""
    opt += (
        f", expert kernel {r['kernel']} (--kernel)"
        if r.get("kernel") not in (None, "", "auto")
        else ""
    )
    return (
        f"d_model={r['d_model']} d_hidden={r['d_hidden']}, {mode}; {r['device']} {r['dtype']}, "
        f"threads={r['threads']}, median of {r['reps']} after {r['warmup']} warm-up{opt}"
    )


def aligned_lines(columns, rows: list[dict]) -> list[str]:
    """A header line and one right-aligned line per row, for (header, key, format) columns."""
    table = [[header for header, _, _ in columns]]
    table += [[cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table]


def format_table(rows: list[dict]) -> str:
    """Right-aligned text table, one line per configuration, then the reasons for skipped ones."""
    lines = [describe(rows)] if rows else []
    lines += aligned_lines(COLUMNS, rows)
    peaks = {row["peak_gflops"] for row in rows if not is_missing(row["peak_gflops"])}
    if peaks:
        lines.append(f"peak for MFU: {', '.join(f'{p:.1f}' for p in sorted(peaks))} GFLOP/s")
    lines += [
        f"{r['status']}: {r['config']} {implementation(r)}: {r['reason']}"
        for r in rows
        if r["status"] != "ok"
    ]
    configs = {implementation(r): r["peer_config"] for r in rows if r.get("peer_config")}
    lines += [f"{name}: {text}" for name, text in configs.items()]
    return "\n".join(lines)


def is_ours(row: dict) -> bool:
    """Whether the row measures this package's layer; rows from before `--peers` have no
    implementation and are ours."""
    return (row.get("implementation") or OURS) == OURS


def implementation(row: dict) -> str:
    """The row's implementation, with its kind for a peer (a peer's configuration names differ
    between its flat and hierarchical entries)."""
    return OURS if is_ours(row) else f"{row['implementation']} ({row['kind']})"


def json_value(value: object) -> object:
    return None if is_missing(value) else value


def write_outputs(
    rows: list[dict],
    *,
    json_path: Path | None = None,
    csv_path: Path | None = None,
    png_path: Path | None = None,
) -> None:
    """Write whichever of the JSON (a list of rows, NaN -> null), CSV and PNG files are given."""
    for path in (json_path, csv_path, png_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: json_value(v) for k, v in row.items()} for row in rows]
    if json_path is not None:
        json_path.write_text(json.dumps(clean, indent=2) + "\n")
    if csv_path is not None:
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(clean)
    if png_path is not None:
        plot_bench(rows).savefig(png_path, dpi=120)


PEER_STYLES = ("s", "^", "D", "v")  # markers of the peers' lines, in order (also perf_scaling's)


def plot_bench(rows: list[dict]) -> Figure:
    """µs per token (MoE solid, its dense baseline dashed) and the ratio, against experts (log2);
    peers (`--peers`) as gray lines with their own markers, dotted where hierarchical."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_time, ax_ratio = fig.subplots(1, 2)
    ours = [r for r in rows if is_ours(r)]
    for kind, color in (("flat", "tab:blue"), ("hierarchical", "tab:orange")):
        ok = sorted(
            (r for r in ours if r["kind"] == kind and r["status"] == "ok"),
            key=lambda r: r["num_experts"],
        )
        if not ok:
            continue
        n = [r["num_experts"] for r in ok]
        ax_time.plot(n, [r["moe_us_per_token"] for r in ok], "o-", color=color, label=f"{kind} MoE")
        dense_us = [r["dense_us_per_token"] for r in ok]
        ax_time.plot(n, dense_us, "x--", color=color, alpha=0.6, label=f"dense (vs {kind})")
        ax_ratio.plot(n, [r["ratio_median"] for r in ok], "o-", color=color, label=kind)
    peer_names = list(dict.fromkeys(r["implementation"] for r in rows if r not in ours))
    for name, marker in zip(peer_names, PEER_STYLES * len(peer_names), strict=False):
        for kind, line in (("flat", "-"), ("hierarchical", ":")):
            ok = sorted(
                (
                    r
                    for r in rows
                    if r.get("implementation") == name and r["kind"] == kind and r["status"] == "ok"
                ),
                key=lambda r: r["num_experts"],
            )
            if ok:
                n = [r["num_experts"] for r in ok]
                style = {"color": "0.35", "marker": marker, "ls": line, "label": f"{name} ({kind})"}
                ax_time.plot(n, [r["moe_us_per_token"] for r in ok], **style)
                ax_ratio.plot(n, [r["ratio_median"] for r in ok], **style)
    for ax, ylabel in ((ax_time, "µs per token (median)"), (ax_ratio, "MoE / dense (median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
        )
        ax.set_xlabel("number of experts")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    fig.suptitle(describe(rows) if rows else "no rows", fontsize=9)
    return fig
