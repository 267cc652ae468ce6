"""`python -m analysis <command>`: run directories -> tidy CSVs -> figures, tables and REPORT.md.

  collect  results/runs/**/ (or an MLflow experiment) -> summary.csv, with snapshots.csv and
           expert_load.csv beside it (analysis/collect.py)
  figures  those CSVs (+ the layer benchmark's bench.json) -> <out>/figures/*.png|pdf,
           <out>/tables/*.md|csv|tex, <out>/REPORT.md, and an MLflow "analysis" run holding them
  experts  run directories with expert statistics -> <out>/figures/expert_load_<sweep>.png and a
           load heatmap with its Lorenz curve per run (analysis/fig_expert_load.py)
`main(argv)` returns an exit code (2 with a one-line error for bad input) and is what the tests
and the workflow call, as moe_impl/cli/__init__.py does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import collect, figures, io, report, rules, tables

SNAPSHOTS_FILE, LOADS_FILE = "snapshots.csv", "expert_load.csv"
DEFAULT_SUMMARY = Path("results/summary.csv")  # collect's output, figures' input
DEFAULT_BENCH = Path("results/bench/bench.json")
VERDICT_METRIC = {rules.REPRODUCED: 1.0, rules.NOT_REPRODUCED: 0.0}  # "not run": no metric


def _add_path(parser: argparse.ArgumentParser, flag: str, default: Path, help_text: str) -> None:
    """A file or folder option with a default (the layout under results/ that the workflow uses)."""
    parser.add_argument(flag, type=Path, default=default, help=help_text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("collect", help="run directories or MLflow runs -> summary.csv")
    c.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        default=[Path("results/runs")],
        metavar="PATH",
        help="folders searched recursively for run directories, or run directories themselves "
        "(default results/runs; the workflow passes exactly the runs its config plans)",
    )
    _add_path(
        c, "--out", DEFAULT_SUMMARY, f"summary CSV; {SNAPSHOTS_FILE} and {LOADS_FILE} go beside it"
    )
    c.add_argument(
        "--from-mlflow",
        metavar="EXPERIMENT",
        help="read this MLflow experiment's finished runs instead of --runs",
    )
    c.add_argument(
        "--uri",
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/results/mlflow.db)",
    )
    f = sub.add_parser("figures", help="summary.csv (+ bench.json) -> figures, tables, REPORT.md")
    _add_path(
        f,
        "--summary",
        DEFAULT_SUMMARY,
        f"from `collect` ({SNAPSHOTS_FILE}, {LOADS_FILE} read beside it)",
    )
    f.add_argument(
        "--bench",
        type=Path,
        nargs="+",
        help=f"bench.json file(s), e.g. one per tokens mode (default: {DEFAULT_BENCH} "
        "if it exists)",
    )
    _add_path(
        f, "--out", Path("results"), "writes figures/, tables/ and REPORT.md here (default results)"
    )
    f.add_argument(
        "--only",
        nargs="+",
        choices=figures.FIGURES,
        metavar="FIGURE",
        help=f"draw only these figures (of {', '.join(figures.FIGURES)})",
    )
    f.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow analysis run")
    f.add_argument("--uri", help="tracking URI for the analysis run (default as for collect)")
    f.add_argument("--experiment", default="analysis", help="its MLflow experiment")


def add_experts_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "experts", help="run directories -> expert load figures (heatmaps, Lorenz, per sweep)"
    )
    e.add_argument(
        "run_dirs",
        nargs="*",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or folders searched for them (default results/runs)",
    )
    _add_path(
        e,
        "--out",
        Path("results"),
        "writes figures/expert_load_<sweep>.png and "
        "figures/experts/<sweep>/<run>.png here (default results)",
    )
    e.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not attach each run's figure to its MLflow run (artifacts under figures/)",
    )


def run_experts(args: argparse.Namespace) -> int:
    """Each MoE run's load heatmap and Lorenz curve, and per sweep its figure (fig_expert_load)."""
    from analysis import fig_expert_load
    from moe_impl.runs.expertstats import read_expert_stats

    data, _ = collect.collect_runs(args.run_dirs or [Path("results/runs")])
    summary, written = data.summary, []
    stats = {}
    per_run: dict[str | Path, list[str | Path]] = {}  # run folder -> its figures, for MLflow
    for _, row in summary.iterrows():
        found = read_expert_stats(row["run_dir"])
        if found is None or not found["snapshots"]:
            continue
        stats[row["run_id"]] = found
        fig = fig_expert_load.run_figure(found, f"{row['sweep']}/{row['name']}")
        folder = args.out / "figures" / "experts" / str(row["sweep"] or "none")
        paths = io.save_figure(fig, folder, Path(row["run_dir"]).name)
        per_run[Path(row["run_dir"])] = [p for p in paths if p.suffix == ".png"]
        written += paths
    for sweep in sorted(set(summary.loc[summary["run_id"].isin(stats), "sweep"])):
        if sweep == "balance":
            fig = fig_expert_load.balance_figure(_balance_panels(summary, stats))
        else:
            fig = fig_expert_load.sweep_figure(summary, sweep)
        written += io.save_figure(fig, args.out / "figures", f"expert_load_{sweep}")
    print(f"{len(stats)} runs with expert statistics -> {len(written)} files under {args.out}")
    if per_run and not args.no_mlflow:
        from moe_impl import tracking  # the only module that talks to MLflow

        for line in tracking.attach_figures(per_run):
            print(line)
    return 0


def _balance_panels(summary, stats: dict) -> list[tuple[str, dict]]:
    """The balance sweep's runs without the balancing losses and with the paper's (0.1, 0.1) (or
    else the largest weights there are), one seed each."""
    runs = collect.sweep(summary, "balance")
    runs = runs[runs["run_id"].isin(stats)].sort_values(["w_importance", "w_load", "run_id"])
    if runs.empty:
        return []
    off = runs[(runs["w_importance"] == 0) & (runs["w_load"] == 0)]
    on = runs[(runs["w_importance"] == 0.1) & (runs["w_load"] == 0.1)]
    picks = [
        off.iloc[0] if not off.empty else runs.iloc[0],
        on.iloc[0] if not on.empty else runs.iloc[-1],
    ]
    return [
        (f"w_importance={r['w_importance']:g}, w_load={r['w_load']:g}", stats[r["run_id"]])
        for r in {p["run_id"]: p for p in picks}.values()
    ]


def run_collect(args: argparse.Namespace) -> int:
    if args.from_mlflow:
        with tempfile.TemporaryDirectory(prefix="analysis_mlflow_") as scratch:
            data = collect.collect_mlflow(args.from_mlflow, args.uri, scratch)
        source = f"MLflow experiment {args.from_mlflow!r}"
    else:
        data, skipped = collect.collect_runs(args.runs)
        for d, why in skipped:
            print(f"skipped ({why}): {d}", file=sys.stderr)
        source = ", ".join(map(str, args.runs)) if len(args.runs) < 4 else f"{len(args.runs)} paths"
    paths = [
        io.write_csv(data.summary, args.out),
        io.write_csv(data.snapshots, args.out.with_name(SNAPSHOTS_FILE)),
        io.write_csv(data.loads, args.out.with_name(LOADS_FILE)),
    ]
    print(f"{len(data.summary)} runs from {source} -> " + ", ".join(map(str, paths)))
    return 0


def run_figures(args: argparse.Namespace) -> int:
    summary = io.read_csv(args.summary)
    if summary.empty:
        raise ValueError(f"{args.summary} has no runs")
    snapshots = io.read_csv(args.summary.with_name(SNAPSHOTS_FILE), required=False)
    loads = io.read_csv(args.summary.with_name(LOADS_FILE), required=False)
    if args.bench is None:
        args.bench = [DEFAULT_BENCH] if DEFAULT_BENCH.is_file() else []
    bench = io.read_bench(args.bench)
    _check_perplexities(summary, args.summary)
    written = []
    for name, fig in figures.all_figures(summary, snapshots, loads, bench, args.only).items():
        written += io.save_figure(fig, args.out / "figures", name)
    for name, table in tables.all_tables(summary, snapshots).items():
        base = args.out / "tables" / name
        written += [
            io.write_csv(table, base.with_suffix(".csv")),
            io.write_text(base.with_suffix(".md"), tables.to_markdown(table)),
            io.write_text(base.with_suffix(".tex"), tables.to_latex(table, tables.CAPTIONS[name])),
        ]
    verdicts = report.verdicts(summary, snapshots)
    written.append(io.write_text(args.out / "REPORT.md", report.render(verdicts, summary)))
    for v in verdicts:
        print(f"{report.CLAIMS[v.key][0]}: {v.status}")
    print(f"wrote {len(written)} files under {args.out}")
    if not args.no_mlflow:
        _log_analysis_run(args, verdicts)
    return 0


def _check_perplexities(summary, path: Path) -> None:
    """Every row of a summary CSV has a test perplexity (collect writes none without one): a
    row without one, edited in or from elsewhere, would reach the verdicts as NaN."""
    if "test_perplexity" not in summary:
        raise ValueError(f"{path}: no test_perplexity column (write it with `analysis collect`)")
    ppl = pd.to_numeric(summary["test_perplexity"], errors="coerce")
    bad = summary.loc[ppl.isna() | ~np.isfinite(ppl), "run_id"].astype(str).tolist()
    if bad:
        raise ValueError(f"{path}: no numeric test_perplexity for {', '.join(bad[:5])}")


def _log_analysis_run(args: argparse.Namespace, verdicts: list[report.Verdict]) -> None:
    """One MLflow run per invocation with the figures, tables, REPORT.md and the inputs as
    artifacts and each verdict as a metric; a failing store only warns (tracking.RunTracker)."""
    from moe_impl import tracking  # the only module that talks to MLflow

    run_dir = args.out / "analysis"  # holds the analysis run's run.json
    (run_dir / "run.json").unlink(missing_ok=True)  # a new MLflow run each time
    config = {
        "summary": str(args.summary),
        "bench": [str(p) for p in args.bench],
        "out": str(args.out),
    }
    tracker = tracking.RunTracker.start(
        run_dir,
        config=config,
        experiment=args.experiment,
        run_name="analysis",
        tags={"kind": "analysis", "mlflow.source.name": "python -m analysis figures"},
        tracking_uri=args.uri,
        system_metrics_interval_s=None,
        runs_view=False,  # its runs are analyses, not training runs
    )
    inputs = [args.summary, args.summary.with_name(SNAPSHOTS_FILE), *args.bench]
    tracker.log_artifacts([args.out / "figures", args.out / "tables", args.out / "REPORT.md"])
    tracker.log_artifacts(inputs, artifact_path="inputs")
    metrics = {
        f"claim.{v.key}": VERDICT_METRIC[v.status] for v in verdicts if v.status in VERDICT_METRIC
    }
    tracker.log_metrics(metrics, step=0)
    logged = tracker.active
    tracker.finish({})
    if logged:
        print(
            f"MLflow run {tracker.run_id} in experiment {args.experiment!r} "
            f"({tracker.tracking_uri})"
        )


COMMANDS = {"collect": run_collect, "figures": run_figures, "experts": run_experts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    add_experts_parser(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:  # user or input errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
