"""`python -m moe_impl <command>`: the contract between the package, the workflow and users.

Each command lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`;
`main(argv)` returns an exit code and is called directly by the tests.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_impl import runtime

# command -> module implementing it
COMMANDS = {
    "bench": "moe_impl.cli.bench",
    "flips": "moe_impl.cli.flips",
    "flops": "moe_impl.cli.flops",
    "gpu-check": "moe_impl.cli.gpu_check",
    "plan": "moe_impl.cli.plan",
    "tracking": "moe_impl.cli.tracking",
    "train": "moe_impl.cli.train",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_impl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_parser(sub)
    args = parser.parse_args(argv)
    # Faster CPU steps (moe_impl/runtime.py); `bench --default-malloc` measures without it.
    if not getattr(args, "default_malloc", False):
        runtime.tune_allocator()
    try:
        return modules[args.command].run(args)
    except ValueError as err:  # user or config errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
