"""`python -m moe_impl flops`: our parameter / ops / FLOP counts of the paper's models (flops.py),
optionally beside the values Tables 1, 7 and 8 print (presets.py).

    python -m moe_impl flops                      # aligned table, every preset
    python -m moe_impl flops --paper --json       # JSON list, one object per preset
    python -m moe_impl flops --model lm1b/MoE-256 --model lm1b/MoE-256-h --paper
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from moe_impl.model import flops
from moe_impl.model.presets import ALL_PRESETS, PAPER_EXCEPTIONS, PAPER_VALUES, PRESETS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "flops", help="params, ops/timestep and training FLOPs of the presets"
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="preset (repeatable; default: every paper preset; cpu/..., cpu-h16/... for the CPU families)",
    )
    p.add_argument("--paper", action="store_true", help="add the values the paper printed")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return p


def select(names: list[str]) -> list[str]:
    """The requested preset names (the paper's when none is given), in the order asked."""
    unknown = [n for n in names if n not in ALL_PRESETS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; valid names: {', '.join(ALL_PRESETS)}")
    return names or list(PRESETS)


def counts(name: str) -> dict:
    """Our counts for one preset, as plain integers."""
    cfg = ALL_PRESETS[name]
    return {
        "model": name,
        "moe": cfg.moe,
        "num_experts": cfg.num_experts,
        "vocab_size": cfg.vocab_size,
        "softmax_samples": cfg.softmax_samples,
        "params_excl_embedding_softmax": flops.params_excl_embedding_softmax(cfg),
        "total_params": flops.total_params(cfg),
        "ops_per_timestep": flops.ops_per_timestep(cfg),
        "expert_ops_per_timestep": flops.expert_ops_per_timestep(cfg),
        "train_flops_per_token": flops.train_flops_per_token(cfg),
    }


def paper_notes(name: str) -> list[str]:
    """Why a printed value of this preset is not our count rounded (PAPER_EXCEPTIONS)."""
    return [
        f"{table} {column}: {kind}, {why}"
        for (table, preset, column), (kind, why) in PAPER_EXCEPTIONS.items()
        if preset == name
    ]


def paper_columns(name: str) -> dict:
    """The published row as `paper_<column>` keys: numbers as floats, None where not printed."""
    if name not in PAPER_VALUES:
        return {"paper_notes": ["not in the paper (scaled-down CPU preset)"]}
    row = PAPER_VALUES[name]
    out = {}
    for field in dataclasses.fields(row):
        value = getattr(row, field.name)
        if isinstance(value, str) and field.name not in ("source", "row"):
            value = float(value)
        out[f"paper_{field.name}"] = value
    out["paper_notes"] = paper_notes(name)
    return out


def _table(rows: list[dict], paper: bool) -> str:
    header = ["model", "params (M)", "ops/step (M)", "total (B)", "train GFLOP/tok"]
    lines = []
    for r in rows:
        cells = [
            r["model"],
            f"{r['params_excl_embedding_softmax'] / 1e6:.2f}",
            f"{r['ops_per_timestep'] / 1e6:.3f}",
            f"{r['total_params'] / 1e9:.3f}",
            f"{r['train_flops_per_token'] / 1e9:.4f}",
        ]
        if paper and r["model"] in PAPER_VALUES:
            p = PAPER_VALUES[r["model"]]
            cells += [p.params_M, p.ops_M, p.total_B, p.tflops_per_gpu or "-", p.source]
        elif paper:
            cells += ["-", "-", "-", "-", "not in the paper"]
        lines.append(cells)
    if paper:
        header += ["paper params", "paper ops", "paper total", "paper TFLOPS/GPU", "source"]
    widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt(header), *(fmt(c) for c in lines)]
    if paper:
        out += [f"note: {r['model']}, {n}" for r in rows for n in paper_notes(r["model"])]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    rows = [counts(name) for name in select(args.model)]
    if args.json:
        if args.paper:
            rows = [{**r, **paper_columns(r["model"])} for r in rows]
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, args.paper))
    return 0
