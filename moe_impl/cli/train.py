"""`python -m moe_impl train --config FILE --set key=value --out DIR [--resume]`.

Writes the run directory of moe_impl/runs/rundir.py. Under torchrun (several processes) the run is
expert-parallel (moe_impl/parallel, the config's `distributed` section) and rank 0 writes the
files. Exit codes: 0 finished (or already finished), 2 a config or data error (one line naming the
key; also a bad --out, a run directory another process trains into, no intact checkpoint to resume
from, a lost config.yaml that no checkpoint holds, train.threads above the CPUs this process may
run on, or a checkpoint or run-directory file the disk refused, ENOSPC), 3 the
run diverged, one line `error: ... diverged ...`: a non-finite loss (the last good checkpoint is
kept), or an evaluation whose perplexity is not finite (summary.json is written with `diverged`,
its reason, and every --resume answers the same; see moe_impl.train.loop.TrainingDiverged).

`--resume` continues the run in --out when the config resolves to the values it was started with
(moe_impl/train/identity.py; train.threads and train.progress may differ). Without --config it
reads the run's own config.yaml, under any --set, so `--out DIR --resume` needs nothing else (a
config.yaml that was deleted is written back from the newest intact checkpoint's config, with one
line on stderr, or refused in one line where no checkpoint holds it). A config with other values
(than config.yaml's, or the checkpoint's) is refused, naming each key with its saved and new value;
with `--replace-changed` the old run directory is moved to a hidden sibling
`.NAME.replaced-<UTC time>` (every file kept) and a new run starts in DIR. The workflow's train
rule passes both.

SIGINT (Ctrl-C), SIGTERM (`timeout`, SLURM) or SIGHUP (a closed terminal or ssh session; not under
nohup) stops the run after the step in progress, with a checkpoint at that step and the MLflow run
KILLED: one line on stderr ("interrupted at step N; `python -m moe_impl train --out DIR --resume`
continues") and exit code 130, 143 or 129 (128 + the signal); a second signal stops at once
(moe_impl/train/interrupt.py, docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_impl.runs import lock, rundir
from moe_impl.train.config import dump, load_config


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a language model (LSTM-MoE or a baseline) into a run directory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config (repeatable; later files override earlier ones)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one key, e.g. --set model.preset=cpu/MoE-256 --set train.tokens=2e6",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (required unless --print-config)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (a finished run is left as is); "
        "without --config, from its saved config.yaml (--set overrides it); a config with "
        "other values is refused",
    )
    p.add_argument(
        "--replace-changed",
        action="store_true",
        help="with --resume (implied): when the config's values differ from the run in --out, "
        "move that run to .NAME.replaced-<UTC time> beside it (kept) and start a new one",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--check-data",
        action="store_true",
        help="open the corpus (layout, vocabulary) and exit: what the workflow runs before training",
    )
    return p


def _config_files(args: argparse.Namespace, resume: bool) -> list:
    """The config files to load: --config's; on --resume without them, the run's own config.yaml
    (under any --set), written back from its checkpoint first if it was deleted (never a default
    config for a run that has one)."""
    if not (resume and not args.config and args.out):
        return args.config
    run_dir = Path(args.out)
    saved = run_dir / rundir.CONFIG_FILE
    if not saved.is_file() and run_dir.is_dir():
        lock.check_run_dir(run_dir)  # not while another process trains into it
        from moe_impl.train.state import restore_config  # torch: only for a lost config.yaml

        restore_config(run_dir)
    return [saved] if saved.is_file() else []


def _number(value, spec: str) -> str:
    """`value` formatted with `spec`; null (a summary's NaN or inf) as is."""
    return "null" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    resume = args.resume or args.replace_changed
    cfg = load_config(_config_files(args, resume), args.overrides)
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    if args.check_data:
        from moe_impl.train.corpus import build_corpus, eval_shortfall

        corpus = build_corpus(cfg)
        if (warning := eval_shortfall(corpus, cfg)) is not None:
            print(warning, file=sys.stderr)  # the workflow's check_data log shows it
        print(f"data ok: {corpus.name}, vocabulary {corpus.vocab_size:,}")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required: the run directory to write")
    lock.check_run_dir(args.out)  # before anything is built: not a file, not in use by another run
    from moe_impl.train.loop import Trainer, TrainingDiverged, TrainingInterrupted

    try:
        trainer = Trainer(cfg, args.out, resume=resume, replace_changed=args.replace_changed)
    except KeyboardInterrupt:  # Ctrl-C while building (SIGTERM then ends the process as usual)
        started = (Path(args.out) / rundir.CONFIG_FILE).is_file()
        resume = f"`python -m moe_impl train --out {args.out} --resume` continues"
        print(
            f"interrupted before training started; {resume if started else 'nothing was written'}",
            file=sys.stderr,
        )
        return 130
    try:
        summary = trainer.run()
    except TrainingDiverged as err:
        if trainer.ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:  # after a step and its checkpoint (or a second signal)
        if trainer.ctx.is_main:
            print(err, file=sys.stderr)
        return err.exit_code
    finally:
        trainer.ctx.close()
    if not trainer.ctx.is_main:  # under torchrun, rank 0 reports
        return 0
    excess = summary.get("excess_nll")
    print(
        f"{summary['name']}: test perplexity {_number(summary['test_perplexity'], '.3f')} "
        f"(nll {_number(summary['test_nll'], '.4f')}"
        + (f", excess over the oracle {excess:.4f}" if excess is not None else "")
        + f"), {summary['steps']} steps, {_number(summary['wall_time_s'], '.0f')} s -> {args.out}"
    )
    return 0
