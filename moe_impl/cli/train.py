"""`python -m moe_impl train --config FILE --set key=value --out DIR [--resume]`.

Writes the run directory of moe_impl/runs/rundir.py. Under torchrun (several processes) the run is
expert-parallel (moe_impl/parallel, the config's `distributed` section) and rank 0 writes the
files. Exit codes: 0 finished (or already finished), 2 a config or data error (one line naming the
key), 3 the loss diverged (the last good checkpoint is kept; see train.TrainingDiverged).
"""

from __future__ import annotations

import argparse
import sys

from moe_impl.train.config import dump, load_config


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a language model (LSTM-MoE or a baseline) into a run directory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help="YAML config (repeatable; later files override earlier ones)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override one key, e.g. --set model.preset=cpu/MoE-256 --set train.tokens=2e6",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="run directory (required unless --print-config)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last checkpoint (a finished run is left as is)",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--check-data", action="store_true",
        help="open the corpus (layout, vocabulary) and exit: what the workflow runs before training",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    if args.check_data:
        from moe_impl.train.corpus import build_corpus

        corpus = build_corpus(cfg)
        print(f"data ok: {corpus.name}, vocabulary {corpus.vocab_size:,}")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required: the run directory to write")
    from moe_impl.train.loop import Trainer, TrainingDiverged

    trainer = Trainer(cfg, args.out, resume=args.resume)
    try:
        summary = trainer.run()
    except TrainingDiverged as err:
        if trainer.ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.ctx.close()
    if not trainer.ctx.is_main:  # under torchrun, rank 0 reports
        return 0
    excess = summary.get("excess_nll")
    print(
        f"{summary['name']}: test perplexity {summary['test_perplexity']:.3f} "
        f"(nll {summary['test_nll']:.4f}"
        + (f", excess over the oracle {excess:.4f}" if excess is not None else "")
        + f"), {summary['steps']} steps, {summary['wall_time_s']:.0f} s -> {args.out}"
    )
    return 0
