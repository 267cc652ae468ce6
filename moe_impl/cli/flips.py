"""`python -m moe_impl flips`: the routing-flip meter (moe_impl/layer/routing_flips.py) on trained
runs: the share of the MoE layer's top-k choices (expert slots; both levels of a hierarchical layer,
as final experts) that change when its gate matmuls run at another precision than float32
(MoEConfig.gate_precision), measured on held-out batches of the run's own corpus.

    python -m moe_impl flips --run-dir results/runs/lm1b/MoE-256-h/s0
    python -m moe_impl flips --run-dir A --run-dir B --precision bf16 --tokens 20000 --json

Each run's newest checkpoint (one process's) is loaded with the config it carries; the model
evaluates the split (`eval.split` by default) in its training dtype, without dropout or gate
noise, and the MoE layer's input is measured as it arrives, at the scored positions
(moe_impl/train/flips.py). On a CPU only bf16 can differ: TF32 is a CUDA mode ("tf32" is float32
there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_impl.layer.config import GATE_PRECISIONS
from moe_impl.train.flips import measure_run

DEFAULT_PRECISIONS = ("bf16", "tf32")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "flips",
        help="share of a trained run's routing choices that change at a lower gate precision",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="a training run's directory (repeatable)",
    )
    p.add_argument(
        "--precision",
        action="append",
        choices=[p for p in GATE_PRECISIONS if p != "float32"],
        help="gate precision to compare with float32 (repeatable; default: bf16 and tf32)",
    )
    p.add_argument("--tokens", type=int, help="held-out tokens to score (default: eval.tokens)")
    p.add_argument("--split", help="held-out split (default: the run's eval.split)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    return p


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device")
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens must be a positive integer, got {args.tokens}")
    precisions = args.precision or list(DEFAULT_PRECISIONS)
    for run_dir in args.run_dir:
        result = measure_run(run_dir, precisions, device, tokens=args.tokens, split=args.split)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        head = (
            f"{result['model']} ({run_dir}, step {result['step']}, {result['dtype']} on "
            f"{result['device']}): {result['tokens']:,} {result['split']} tokens, "
            f"{result['choices']:,} choices"
        )
        print(head)
        for p, f in result["flips"].items():
            print(f"  {p:>5}: {f['flipped']:,} flipped, {100 * f['share']:.4f}%")
    return 0
