"""`python -m moe_impl plan`: every run of a workflow config, before it runs (moe_impl/train/plan.py).

    python -m moe_impl plan                                    # config/config.yaml, a table
    python -m moe_impl plan --configfile config/gpu.yaml       # the one-GPU reproduction
    python -m moe_impl plan --configfile config/gpu.yaml --format json
    python -m moe_impl plan --configfile config/gpu.yaml config/gpu-80gb.yaml   # on an 80 GB GPU

Each run: its batch (positions per step, micro-batches), steps and training tokens, Sec. 3.1's
tokens per expert per step and the training tokens per parameter, each beside the paper's
(App. C.1 / D), the estimated peak memory (device GiB on a GPU, host MB for the scheduler) and the
estimated wall time from the latest measured step times (workflow/resources/), with the total.
"""

from __future__ import annotations

import argparse
import json

from moe_impl.train.plan import Plan, PlanRow, plan


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="every run of a workflow config with its regime, memory and time estimates"
    )
    p.add_argument(
        "--configfile",
        nargs="+",
        default=["config/config.yaml"],
        metavar="FILE",
        help="the workflow config (default config/config.yaml); several are merged as Snakemake "
        "merges them, e.g. config/gpu.yaml config/gpu-80gb.yaml",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def _num(value, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def _pair(ours, paper, spec: str) -> str:
    """`ours (paper)`, the paper's value in parentheses where it has one."""
    return _num(ours, spec) + ("" if paper is None else f" ({_num(paper, spec)})")


HEADER = (
    "run",
    "experts",
    "batch (paper)",
    "micro",
    "steps (paper)",
    "tokens",
    "tok/expert/step (paper)",
    "tok/param (paper)",
    "peak",
    "hours",
)


def _cells(r: PlanRow) -> tuple[str, ...]:
    peak = (
        f"{r.device_peak_gib:.1f} GiB" if r.device_peak_gib is not None else f"{r.host_mem_mb:,} MB"
    )
    return (
        f"{r.sweep}/{r.run}",
        _num(r.num_experts),
        _pair(r.batch_positions, r.paper_batch_positions, ",.0f"),
        str(r.micro_batches),
        _pair(r.steps, r.paper_steps, ",.0f"),
        f"{r.train_tokens / 1e6:,.1f}M",
        _pair(r.tokens_per_expert_per_step, r.paper_tokens_per_expert_per_step, ",.1f"),
        _pair(r.tokens_per_parameter, r.paper_tokens_per_parameter, ",.2f"),
        peak,
        _num(r.hours, ".2f"),
    )


def table(p: Plan) -> str:
    rows = [HEADER, *(_cells(r) for r in p.rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    peak = (
        ""
        if p.max_device_peak_gib is None
        else f", largest device peak {p.max_device_peak_gib:.1f} GiB"
    )
    lines.append(f"\n{len(p.rows)} runs of {p.config}: {p.total_hours:.2f} hours estimated{peak}")
    if p.unestimated:
        lines.append(
            f"no time estimate (no measurement) for {len(p.unestimated)} runs: "
            + ", ".join(p.unestimated)
        )
    times = sorted({r.time_source for r in p.rows})
    lines.append("time from: " + "; ".join(times))
    lines.append(
        "peak: device GiB from workflow/resources/step_times.yaml where the run is on a GPU, else "
        "host MB (the scheduler's mem_mb) from workflow/resources/peak_memory.yaml or analytic; "
        "--format json gives each row's sources"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = plan(args.configfile)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(table(result))
    return 0
