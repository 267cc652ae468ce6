"""`python -m moe_impl gpu-check`: prove the CUDA path on one GPU and measure it, in one command.

Writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after every section, moe_impl/gpucheck/
report.py). Exit code 0 when every section passed or was skipped with a reason, 1 when any failed,
2 for bad arguments (no CUDA device for --device cuda among them).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

EXIT_SOME_FAILED = 1

SECTIONS = (  # name -> title, in the order they run
    ("environment", "versions, device, memory, peak FLOP/s and a measured bf16 matmul"),
    ("exactness", "MoE and HierarchicalMoE on the device against the CPU float64 reference"),
    ("kernels", "grouped-GEMM and blocked expert kernels against each other (bf16)"),
    ("scale", "131072 experts: forward + backward with sparse expert gradients"),
    ("layer_speed", "the layer against a FLOP-matched dense FFN (bf16)"),
    ("lm_step", "the paper's 1B-word models' training step, TFLOPS per GPU beside Table 7"),
    ("trainer", "the real trainer with NVML telemetry"),
    ("gate_precision", "bf16 and TF32 gate matmuls: exactness, routing flips, step time"),
    ("distributed", "bench --distributed under torchrun, one process"),
    ("workflow", "the one-GPU reproduction: timed steps of each model, projected wall time"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gpu-check",
        help="check and measure the CUDA path on one GPU (about 8 minutes)",
        description=__doc__.split("\n")[0],
        epilog="exit codes: 0 every section passed or was skipped; 1 some section failed; "
        "2 bad arguments (e.g. --device cuda without a CUDA device)",
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="toy sizes: seconds, for tests and CPUs")
    p.add_argument("--out", type=Path, required=True, help="write gpu_check.{json,md} here")
    p.add_argument(
        "--only",
        help="comma-separated sections to run (default all): "
        + ", ".join(name for name, _ in SECTIONS),
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="sections that would start after this many minutes are skipped, with that reason "
        "(default 8)",
    )
    p.add_argument(
        "--workflow-config",
        help="workflow config to project (default config/gpu.yaml; config/smoke.yaml with --quick)",
    )


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cuda, cuda:N or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: no CUDA device (torch {torch.__version__} sees none); "
                "run with --device cpu --quick to check the script itself"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: gpu-check runs on cuda or cpu")
    return device


def run(args: argparse.Namespace) -> int:
    names = [name for name, _ in SECTIONS]
    only = names if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in names]
    if unknown:
        raise ValueError(
            f"--only: unknown section(s) {', '.join(unknown)}; valid: {', '.join(names)}"
        )
    if not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    device = resolve_device(args.device)

    from moe_impl.gpucheck.report import Report
    from moe_impl.gpucheck.sizes import FULL, QUICK

    sizes = QUICK if args.quick else FULL
    command = "python -m moe_impl " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "gpu-check"
    report = Report(
        args.out,
        {"command": command, "device": str(device), "quick": args.quick, "sections_run": only},
    )
    out = args.out
    # section -> (module of moe_impl.gpucheck, function, its arguments); each module is imported
    # inside its own section, so that one that fails to import fails only that section
    work = {
        "environment": ("environment", "check_environment", (device, args.quick)),
        "exactness": ("exactness", "check_against_reference", (device, sizes)),
        "kernels": ("exactness", "check_kernels", (device, sizes)),
        "scale": ("exactness", "check_scale", (device, sizes)),
        "layer_speed": ("speed", "layer_speed", (device, sizes)),
        "lm_step": ("speed", "lm_step_speed", (device, sizes)),
        "trainer": ("processes", "check_trainer", (device, sizes, out)),
        "gate_precision": (
            "gate_precision",
            "check_gate_precision_after_trainer",
            (device, sizes, out),
        ),
        "distributed": ("processes", "check_distributed", (device, sizes, out)),
        "workflow": (
            "workflow_config",
            "project_workflow",
            (device, sizes, args.workflow_config, out),
        ),
    }

    def section(module: str, function: str, arguments: tuple):
        return lambda: getattr(importlib.import_module(f"moe_impl.gpucheck.{module}"), function)(
            *arguments
        )

    deadline = time.monotonic() + 60 * args.max_minutes
    for name, title in SECTIONS:
        if name not in only:
            continue
        if time.monotonic() > deadline:
            report.skip(name, title, f"--max-minutes={args.max_minutes:g} spent before it started")
            continue
        report.run(name, title, section(*work[name]))
    report.write()
    verdict = "passed" if report.passed else "FAILED"
    print(f"[gpu-check] {verdict}: {out / 'gpu_check.md'}", flush=True)
    return 0 if report.passed else EXIT_SOME_FAILED
