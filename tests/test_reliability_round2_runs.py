"""Runs that survive what users do, round two (issue 32): a full disk while the run directory is
written, a thread count the machine cannot give, and a closed terminal.

- A full disk (finding 4): when metrics.jsonl, run.json, expert_load.json or summary.json cannot be
  written (ENOSPC), the command ends in one line naming the file and the full disk, exit 2, as a
  checkpoint the disk refuses does (tests/test_reliability_checkpoints.py); metrics.jsonl keeps
  every complete record and no partial line, no `.tmp` file is left, and `--resume`, once space is
  freed, finishes with the losses of an uninterrupted run.
- Threads (finding 5): `train.threads` or `bench --threads` above the CPUs this process may run on
  (its affinity) is refused in one line naming the key, before a thread starts; the config itself
  stays valid on any machine (a config.yaml is read on machines other than the one that runs it).
- SIGHUP (finding 12a: a terminal or ssh session closed) stops a run as SIGTERM does: after the step
  in progress, with a checkpoint at it, the MLflow run KILLED, the one "interrupted" line and exit
  129; output to the closed terminal is dropped instead of ending the run. A SIGHUP ignored from
  the start (nohup) stays ignored.

Unit tier: in-process TINY runs (tests/helpers.py: 12 steps, checkpoints at steps 5 and 10).
Integration tier: the real command on a pseudo-terminal that is closed under it.
No test starts more threads than the machine has: the refusals are tried with one thread more than
the CPUs, and torch.set_num_threads is guarded so that a regression fails instead of starting them
(100000 threads crashed the machine and filled its process table)."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, losses, set_args, tiny

from moe_impl import runtime, tracking
from moe_impl.cli import bench, main
from moe_impl.runs import rundir
from moe_impl.train import checkpoint, loop
from moe_impl.train.loop import Trainer, TrainingInterrupted

SETS = set_args(TINY)
CPUS = len(os.sched_getaffinity(0))  # what this process may run on (taskset, SLURM, a cpuset)
LINE = re.compile(
    r"interrupted at step (\d+); `python -m moe_impl train --out (.+) --resume` continues"
)


def one_line(err: str) -> str:
    """The only line of stderr (asserts there is one and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run_dir) if r["kind"] == "train"]


def complete_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, asserting that every line is one whole record."""
    text = (run_dir / rundir.METRICS_FILE).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --- a full disk (finding 4) ---------------------------------------------------------------------


class FillsUp:
    """A file that takes half of the write `when(data)` picks, then fails as a full disk does."""

    def __init__(self, file, when) -> None:
        self._file, self._when = file, when

    def write(self, data):
        if self._when(data):
            self._file.write(data[: len(data) // 2])
            self._file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def train_record(step: int):
    """Whether a write is the train record of `step` (text or bytes)."""

    def when(data) -> bool:
        text = data.decode() if isinstance(data, bytes) else data
        return f'"kind": "train", "step": {step},' in text

    return when


def assert_full_disk_line(err: str, file: Path) -> None:
    line = one_line(err)
    assert line.startswith("error:") and f"{str(file)!r}" in line, line
    assert "ENOSPC" in line and "disk is full" in line and "--resume" in line, line


def test_a_full_disk_while_appending_metrics_is_one_line_and_loses_nothing(
    tmp_path, capsys, monkeypatch
):
    """The disk fills half-way through step 8's record: one line, exit 2, the seven records
    before it whole and no partial line; --resume (space freed) logs every step once."""
    whole = Trainer(tiny(), tmp_path / "whole").run()
    out = tmp_path / "full"
    real_open = open

    def opens(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FillsUp(f, train_record(8)) if Path(file).name == rundir.METRICS_FILE else f

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "open", opens, raising=False)  # rundir's own open() only
        assert main(["train", "--out", str(out), *SETS]) == 2
    assert_full_disk_line(capsys.readouterr().err, out / rundir.METRICS_FILE)
    records = complete_records(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 8))

    summary = Trainer(tiny(), out, resume=True).run()
    assert losses(out) == losses(tmp_path / "whole")
    assert summary["test_nll"] == whole["test_nll"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("name", [rundir.RUN_FILE, rundir.EXPERT_LOAD_FILE, rundir.SUMMARY_FILE])
def test_a_full_disk_while_writing_a_json_file_is_one_line_and_loses_nothing(
    tmp_path, capsys, monkeypatch, name
):
    """`name`'s temporary file is a link to /dev/full, which fails every write with ENOSPC as a
    full file system does: one line, exit 2, no temporary file left, metrics.jsonl whole; --resume
    finishes with the losses and test NLL of an uninterrupted run."""
    whole = Trainer(tiny(), tmp_path / "whole").run()
    out = tmp_path / "full"
    real = rundir.write_json

    def full_disk(path, data):
        path = Path(path)
        if path.name == name:
            path.with_name(path.name + ".tmp").symlink_to("/dev/full")
        return real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "write_json", full_disk)
        assert main(["train", "--out", str(out), *SETS]) == 2
    assert_full_disk_line(capsys.readouterr().err, out / name)
    assert not [p.name for p in out.rglob("*.tmp")]
    assert not (out / name).exists() and not rundir.is_finished(out)
    if (out / rundir.METRICS_FILE).exists():
        complete_records(out)

    summary = Trainer(tiny(), out, resume=True).run()
    assert losses(out) == losses(tmp_path / "whole")
    assert summary["test_nll"] == whole["test_nll"]
    assert [r["step"] for r in complete_records(out) if r["kind"] == "eval"] == [12]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_the_kernels_enospc_on_an_append_is_one_line(tmp_path):
    (tmp_path / rundir.METRICS_FILE).symlink_to("/dev/full")
    with pytest.raises(ValueError, match="ENOSPC") as err:
        rundir.append_metrics(tmp_path, {"kind": "train", "step": 1})
    assert "\n" not in str(err.value) and "disk is full" in str(err.value)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_rewrite_the_disk_refuses_leaves_the_file_as_it_was(tmp_path):
    """What a resume does to metrics.jsonl (cut back to its checkpoint) and a new run to
    config.yaml: written whole through a temporary file, or not at all."""
    path = tmp_path / rundir.METRICS_FILE
    before = '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
    path.write_text(before)
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")
    with pytest.raises(ValueError, match="ENOSPC") as err:
        rundir.write_text(path, '{"kind": "train", "step": 1}\n')
    assert "\n" not in str(err.value) and f"{str(path)!r}" in str(err.value)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [rundir.METRICS_FILE]
    rundir.write_text(path, "{}\n")  # space again
    assert path.read_text() == "{}\n"


# --- threads (finding 5) -------------------------------------------------------------------------


@pytest.fixture
def no_thread_starts(monkeypatch):
    """torch.set_num_threads fails the test above the CPUs here instead of starting the threads."""
    real = torch.set_num_threads
    before = torch.get_num_threads()

    def guarded(n: int) -> None:
        if n > CPUS:
            raise AssertionError(f"torch.set_num_threads({n}) was called on {CPUS} CPUs")
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", guarded)
    yield
    real(before)


@pytest.mark.parametrize("threads", [CPUS + 1, 100_000])
def test_train_threads_above_the_cpus_is_refused_naming_the_key(
    tmp_path, capsys, no_thread_starts, threads
):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SETS, "--set", f"train.threads={threads}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: train.threads must be at most {CPUS}"), line
    assert f"got {threads}" in line
    assert not out.exists()  # refused before anything was written


def test_the_config_holds_any_thread_count():
    """A config is read where it does not run (the workflow on a login node, a resumed run's saved
    config.yaml on a smaller machine): the count is checked where the threads are set."""
    assert tiny("train.threads=100000").train.threads == 100_000


@pytest.mark.parametrize("distributed", [False, True], ids=["bench", "bench-distributed"])
def test_bench_threads_above_the_cpus_is_refused(
    capsys, monkeypatch, no_thread_starts, distributed
):
    import moe_impl.parallel

    def measures(*args, **kwargs):
        raise AssertionError("a configuration was measured")

    monkeypatch.setattr(bench, "run_child", measures)
    monkeypatch.setattr(moe_impl.parallel, "spawn", measures)
    argv = ["bench", "--experts", "4", "--device", "cpu", "--threads", str(CPUS + 1)]
    assert main(argv + (["--distributed"] if distributed else [])) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --threads must be at most {CPUS}") and f"got {CPUS + 1}" in line


def test_the_cap_is_the_cpus_this_process_may_run_on(monkeypatch):
    """A SLURM allocation, taskset or a container's cpuset narrows the affinity, not
    os.cpu_count(); where there is no affinity (macOS), the CPU count."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert runtime.usable_cpus() == 3
    runtime.check_threads("train.threads", 3)
    runtime.check_threads("train.threads", None)  # torch's default
    with pytest.raises(ValueError, match=r"^train\.threads must be at most 3, .*got 4$"):
        runtime.check_threads("train.threads", 4)
    monkeypatch.delattr(os, "sched_getaffinity")
    assert runtime.usable_cpus() == (os.cpu_count() or 1)


# --- SIGHUP (finding 12a) ------------------------------------------------------------------------


def _previous(signum, frame):  # stands for whatever handler the caller had installed
    raise AssertionError(f"the trainer's handler was not installed for signal {signum}")


@pytest.fixture
def hup_handled(monkeypatch):
    """SIGHUP handled by `_previous` during the test (a SIGHUP never ends pytest); sys.stdout and
    sys.stderr are put back afterwards (a hangup leaves them wrapped)."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    saved = signal.signal(signal.SIGHUP, _previous)
    yield
    signal.signal(signal.SIGHUP, saved)


def hung_up_at(trainer: Trainer, at_step: int) -> None:
    """The process gets a SIGHUP while step `at_step` (0-based) trains."""
    step = trainer.train_step

    def hangs_up():
        if trainer.step == at_step:
            os.kill(os.getpid(), signal.SIGHUP)  # the handler runs before the next line
        return step()

    trainer.train_step = hangs_up


def test_a_sighup_stops_after_the_step_with_a_checkpoint(tmp_path, hup_handled):
    cfg = tiny("train.checkpoint_every=100")  # the only checkpoint is the one the signal writes
    trainer = Trainer(cfg, tmp_path / "cut")
    hung_up_at(trainer, 3)  # while step 4 (1-based) trains
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    err = info.value
    assert (err.signum, err.step, err.exit_code) == (signal.SIGHUP, 4, 129)
    assert err.checkpoint == checkpoint.latest(tmp_path / "cut")
    assert err.checkpoint.name == "step-00000004.pt"
    assert LINE.fullmatch(str(err)).groups() == ("4", str(tmp_path / "cut"))
    assert train_steps(tmp_path / "cut") == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGHUP) is _previous  # the caller's handler is back

    Trainer(cfg, tmp_path / "whole").run()
    Trainer(cfg, tmp_path / "cut", resume=True).run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_a_sighup_ignored_from_the_start_stays_ignored(tmp_path):
    """`nohup` starts a process with SIGHUP ignored so that it outlives its terminal."""
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        trainer = Trainer(tiny(), tmp_path / "r")
        hung_up_at(trainer, 3)
        assert trainer.run()["steps"] == 12
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, saved)


class HungUp(io.TextIOBase):
    """A closed terminal: every write fails with EIO (a pipe nobody reads would: EPIPE)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_the_command_exits_129_when_its_terminal_is_gone(tmp_path, hup_handled, monkeypatch):
    """The hangup closes stdout and stderr with the terminal, and the progress line of step 3
    fails before the SIGHUP is handled (at step 4), as a fast run's can: the run goes on, stops
    after step 4 with its checkpoint, the last message fails too, and the command exits 129."""
    out = tmp_path / "r"
    real = loop.Trainer.train_step

    def step(self):
        if self.step == 2:
            sys.stdout, sys.stderr = HungUp(), HungUp()
        elif self.step == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(self)

    sets = set_args(["train.progress=lines", "train.log_every=1"])
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", sys.stdout)
        patch.setattr(sys, "stderr", sys.stderr)
        patch.setattr(loop.Trainer, "train_step", step)
        assert main(["train", "--out", str(out), *SETS, *sets]) == 129
    assert checkpoint.latest(out).name == "step-00000004.pt"
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert train_steps(out) == list(range(1, 13))


# --- the real command, its terminal closed ------------------------------------------------------

STEPS = 60  # TINY's 192 tokens per step: a run of a few seconds, long enough to be hung up on


def run_status(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.resolve_tracking_uri()).get_run(run_id).info.status


def _controlling_terminal() -> None:
    """In the child (a new session): make its stdin, the pty, its controlling terminal, so that
    closing the other end hangs it up and the kernel sends it SIGHUP."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def read_until_step(master: int, step: int, proc: subprocess.Popen) -> None:
    """Read the terminal until the run's progress line of `step` ("NAME step N/60 loss ...")."""
    seen, deadline = "", time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                seen += os.read(master, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal: it ended
                break
        if any(int(n) >= step for n in re.findall(r" step (\d+)/", seen)):
            return
        if proc.poll() is not None:
            break
    pytest.fail(f"the run did not reach step {step}: exit {proc.poll()}, output {seen[-2000:]!r}")


@pytest.mark.integration
@pytest.mark.parametrize("stderr", ["terminal", "file"])
def test_closing_the_terminal_stops_the_command_like_sigterm(tmp_path, stderr):
    """The command on a pseudo-terminal (its controlling terminal), MLflow on; the terminal is
    closed at step 3 or later: exit 129 after a checkpoint at the step it stopped at, every step
    before logged once, the MLflow run KILLED; with stderr in a file, the one line is there.
    --resume then finishes the run."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    overrides = [
        *TINY,
        f"train.tokens={192 * STEPS}",
        "train.progress=lines",  # a line per step on the terminal: where the run is
        "train.log_every=1",
        "tracking.enabled=true",  # the session's store (MLFLOW_TRACKING_URI)
        f"experiment=rel-sighup-{stderr}",
    ]
    cmd = [sys.executable, "-m", "moe_impl", "train", "--out", str(out), *set_args(overrides)]
    master, slave = os.openpty()
    with open(log, "w") as err_file:
        proc = subprocess.Popen(
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=slave if stderr == "terminal" else err_file,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
    os.close(slave)
    try:
        read_until_step(master, 3, proc)
        os.close(master)  # the terminal is gone: the kernel sends the session SIGHUP
        master = None
        code = proc.wait(timeout=120)
    finally:
        if master is not None:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 129, log.read_text()
    stopped = checkpoint.load(checkpoint.latest(out))["step"]
    assert 3 <= stopped < STEPS
    assert train_steps(out) == list(range(1, stopped + 1))
    run_id = rundir.read_json(out / rundir.RUN_FILE)[tracking.MLFLOW_RUN_KEY]
    assert run_status(run_id) == "KILLED"
    if stderr == "file":
        err = log.read_text()
        assert "Traceback" not in err
        (line,) = [x for x in err.splitlines() if "interrupted" in x]
        assert LINE.fullmatch(line).groups() == (str(stopped), str(out))

    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert train_steps(out) == list(range(1, STEPS + 1))
    assert run_status(run_id) == "FINISHED"
