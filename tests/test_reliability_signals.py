"""Reliability under SIGTERM and SIGINT (what `timeout`, SLURM and Ctrl-C send): the trainer
finishes the step it is in, writes a checkpoint at that step, ends the MLflow run as KILLED, prints
one line naming the step and the `--resume` command, and exits 143 (SIGTERM) or 130 (SIGINT);
`--resume` then finishes with every step logged once, in metrics.jsonl and in MLflow. A second
signal aborts at once; the previous handlers are back afterwards (docs/training.md).

Unit tier: in-process tiny runs that signal themselves. Integration tier: the real command in a
subprocess, signalled from outside, with MLflow on; and two expert-parallel processes of which only
one is signalled, which stop at the same step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import TINY, losses, set_args, tiny

from moe_impl import tracking
from moe_impl.cli import main
from moe_impl.parallel import spawn
from moe_impl.runs import rundir
from moe_impl.train import checkpoint, loop
from moe_impl.train.config import load_config
from moe_impl.train.loop import Trainer, TrainingInterrupted

SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]
IDS = ["SIGTERM", "SIGINT"]
LINE = re.compile(
    r"interrupted at step (\d+); `python -m moe_impl train --out (.+) --resume` continues"
)


def _previous(signum, frame):  # stands for whatever handler the caller had installed
    raise AssertionError(f"the trainer's handler was not installed for signal {signum}")


def signalled_at(trainer: Trainer, at_step: int, *signums: int) -> None:
    """Make the process signal itself (each of `signums`, in turn) while step `at_step` (0-based)
    trains, as `kill` from outside would."""
    step = trainer.train_step

    def signals():
        if trainer.step == at_step:
            for signum in signums:
                os.kill(os.getpid(), signum)  # the handler runs before the next line
        return step()

    trainer.train_step = signals


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture
def previous_handlers():
    """SIGTERM and SIGINT handled by `_previous` (a caller's handlers) during the test."""
    saved = {s: signal.signal(s, _previous) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# --- in process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), SIGNALS, ids=IDS)
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, previous_handlers, signum, code):
    cfg = tiny("train.checkpoint_every=100")  # the only checkpoint is the one the signal writes
    trainer = Trainer(cfg, tmp_path / "cut")
    signalled_at(trainer, 3, signum)  # while step 4 (1-based) trains
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    err = info.value
    assert isinstance(err, KeyboardInterrupt)  # what a library caller catches for Ctrl-C
    assert (err.signum, err.step, err.exit_code) == (signum, 4, code)
    assert err.checkpoint == checkpoint.latest(tmp_path / "cut")
    assert err.checkpoint.name == "step-00000004.pt"
    assert LINE.fullmatch(str(err)).groups() == ("4", str(tmp_path / "cut"))
    assert train_steps(tmp_path / "cut") == [1, 2, 3, 4]
    for s in (signal.SIGTERM, signal.SIGINT):  # the caller's handlers are back
        assert signal.getsignal(s) is _previous

    Trainer(cfg, tmp_path / "whole").run()
    summary = Trainer(cfg, tmp_path / "cut", resume=True).run()
    assert summary["steps"] == 12 and train_steps(tmp_path / "cut") == list(range(1, 13))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert signal.getsignal(signal.SIGTERM) is _previous


def test_a_second_signal_aborts_at_once(tmp_path, previous_handlers):
    trainer = Trainer(tiny(), tmp_path / "r")  # checkpoints every 5 steps
    signalled_at(trainer, 7, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    err = info.value
    assert (err.signum, err.step, err.exit_code) == (signal.SIGINT, 7, 130)
    assert err.checkpoint is None  # step 7 did not finish; the last checkpoint is step 5's
    assert checkpoint.latest(tmp_path / "r").name == "step-00000005.pt"
    assert "\n" not in str(err) and "--resume" in str(err)
    assert signal.getsignal(signal.SIGTERM) is _previous
    summary = Trainer(tiny(), tmp_path / "r", resume=True).run()
    assert summary["steps"] == 12 and train_steps(tmp_path / "r") == list(range(1, 13))


def test_the_cli_prints_one_line_and_exits_128_plus_the_signal(tmp_path, capsys, previous_handlers):
    real = loop.Trainer.train_step

    def step(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    sets = set_args(TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.Trainer, "train_step", step)
        assert main(["train", "--out", str(tmp_path / "r"), *sets]) == 143
    (line,) = capsys.readouterr().err.splitlines()  # one line, nothing else
    assert LINE.fullmatch(line).groups() == ("3", str(tmp_path / "r"))
    assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 0
    assert train_steps(tmp_path / "r") == list(range(1, 13))


def test_a_run_outside_the_main_thread_leaves_signals_alone(tmp_path, previous_handlers):
    """signal.signal works only in the main thread: a Trainer run in another one trains, without
    handlers of its own."""
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(Trainer(tiny(), tmp_path / "r").run()), daemon=True
    )
    thread.start()
    thread.join(timeout=120)
    assert result["steps"] == 12
    assert signal.getsignal(signal.SIGTERM) is _previous


# --- the real command, signalled from outside ---------------------------------------------------

STEPS = 60  # TINY's 192 tokens per step: a run of a few seconds, long enough to be signalled


def histories(run_id: str) -> dict[str, list[int]]:
    """{metric key: its steps, in order} of an MLflow run, system metrics left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.resolve_tracking_uri())
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def run_status(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.resolve_tracking_uri()).get_run(run_id).info.status


@pytest.mark.integration
@pytest.mark.parametrize(("signum", "code"), SIGNALS, ids=IDS)
def test_the_command_signalled_mid_run_then_resumed(tmp_path, signum, code):
    out = tmp_path / "run"
    overrides = [
        *TINY,
        f"train.tokens={192 * STEPS}",
        "train.progress=lines",  # a line per step on stdout: where the run is
        "train.log_every=1",
        "tracking.enabled=true",  # the session's store (MLFLOW_TRACKING_URI)
        f"experiment=rel-signal-{signum}",
    ]
    cmd = [sys.executable, "-m", "moe_impl", "train", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, *set_args(overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # "NAME step 3/60 loss ..."
            if re.search(r" step (\d+)/", line) and int(re.search(r" step (\d+)/", line)[1]) >= 3:
                break
        else:
            pytest.fail(f"the run ended before step 3: {proc.wait()} {proc.stderr.read()}")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "interrupted" in x]
    match = LINE.fullmatch(line)
    assert match and match[2] == str(out), line
    stopped = int(match[1])
    assert 3 <= stopped < STEPS
    assert checkpoint.latest(out).name == f"step-{stopped:08d}.pt"
    assert train_steps(out) == list(range(1, stopped + 1))
    run_id = rundir.read_json(out / rundir.RUN_FILE)[tracking.MLFLOW_RUN_KEY]
    assert run_status(run_id) == "KILLED"
    assert histories(run_id)["train/loss"] == list(range(1, stopped + 1))

    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert train_steps(out) == list(range(1, STEPS + 1))
    assert run_status(run_id) == "FINISHED"
    history = histories(run_id)
    for key, steps in history.items():
        assert len(steps) == len(set(steps)), key  # each step once
    assert history["train/loss"] == list(range(1, STEPS + 1))
    assert history["test_perplexity"] == [STEPS]


# --- expert-parallel: one process signalled, every one stops at the same step ------------------


def signalled_rank(rank: int, world: int, overrides: list[str], out: str, at_step: int) -> dict:
    """A rank of a `spawn`ed run; rank 1 alone is sent SIGTERM while step `at_step` trains."""
    trainer = Trainer(load_config([], overrides), out)
    if rank == 1:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _previous)  # no handler: fail rather than die
        signalled_at(trainer, at_step, signal.SIGTERM)
    try:
        trainer.run()
    except TrainingInterrupted as err:
        return {"step": err.step, "signum": err.signum, "checkpoint": str(err.checkpoint)}
    return {"step": trainer.step, "finished": True}


@pytest.mark.integration
def test_one_signalled_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "dist"
    overrides = [*TINY, "train.checkpoint_every=100", "distributed.replicate_noise=true"]
    ranks = spawn(signalled_rank, 2, (overrides, str(out), 3), timeout_s=180)
    assert [r["step"] for r in ranks] == [4, 4]
    assert all("finished" not in r for r in ranks)
    assert ranks[1]["signum"] == signal.SIGTERM
    assert checkpoint.latest(out).name == "step-00000004"  # a folder: one file per rank
    assert train_steps(out) == [1, 2, 3, 4]
