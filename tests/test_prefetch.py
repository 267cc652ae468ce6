"""Training batches made ahead of the step by worker processes (moe_impl/train/prefetch.py, issue
28): the batch of step s is `corpus.train_batch(s, ...)` bit for bit, in order, from any start
step; a worker that raises, dies, or hangs stops the trainer with one line, never a hang; workers
ignore the stop signals, which the trainer handles, and none is left behind; a run with workers
equals an inline run, killed and resumed or not; the wait for input is logged
(`input_wait_s`, `input_wait_fraction`); the key says how a run executes, not what it is.

Unit tier: the choice of workers, the config key, the identity, the pinned-copy flag, the summary's
fraction, inline batches. Integration tier: everything that forks workers or sends signals, the
CLI in a subprocess among them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, losses, run_until_killed, set_args, tiny

from moe_impl import runtime
from moe_impl.data.synthetic import TopicMarkov, TopicMarkovConfig
from moe_impl.parallel.context import Context
from moe_impl.runs import rundir, runinfo
from moe_impl.train import checkpoint, identity, prefetch
from moe_impl.train.corpus import local_batch
from moe_impl.train.loop import Trainer
from moe_impl.train.prefetch import BatchWorkerError, TrainBatches, resolve_workers
from moe_impl.train.state import LoopState
from moe_impl.train.summary import input_wait_fraction

WORKERS = "train.prefetch_workers=2"
B, L = 4, 16  # a small batch of the small corpus below: a few milliseconds each


@pytest.fixture(scope="module")
def corpus() -> TopicMarkov:
    return TopicMarkov(TopicMarkovConfig(vocab_size=48, num_topics=4, max_len=40))


def children(pid: int | None = None) -> set[int]:
    """The live (or unreaped) child processes of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Whether process `pid` no longer exists (exited and reaped)."""
    return not Path(f"/proc/{pid}").exists()


def assert_same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))


class Failing:
    """A corpus whose batch of step `at` raises, or sleeps for `sleep` seconds instead."""

    name = "synthetic"

    def __init__(self, corpus, at: int, sleep: float | None = None) -> None:
        self.corpus, self.at, self.sleep = corpus, at, sleep

    def train_batch(self, step, batch_size, seq_len):
        if step == self.at:
            if self.sleep is None:
                raise ValueError("no batch\nfor this step")
            time.sleep(self.sleep)
        return self.corpus.train_batch(step, batch_size, seq_len)


# --- unit: choices, the key, the identity, the flags --------------------------------------------


def test_workers_by_corpus_and_device(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)  # never more than the CPUs
    assert resolve_workers(None, "synthetic", "cuda") == 1
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    assert resolve_workers(None, "synthetic", "cuda") == 2
    assert resolve_workers(None, "synthetic", "cpu") == 0  # the CPU default: inline
    assert resolve_workers(3, "synthetic", "cpu") == 3
    assert resolve_workers(0, "synthetic", "cuda") == 0
    for name in ("lm1b", "text"):  # a window of an array: inline whatever the key says
        assert resolve_workers(None, name, "cuda") == resolve_workers(4, name, "cuda") == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "two", "true"])
def test_a_bad_worker_count_names_the_key(value):
    with pytest.raises(ValueError, match=r"^train\.prefetch_workers must be an integer >= 0"):
        tiny(f"train.prefetch_workers={value}")


def test_more_workers_than_cpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^train\.prefetch_workers must be at most \d+"):
        Trainer(tiny(f"train.prefetch_workers={os.cpu_count() + 1}"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_key_says_how_a_run_executes_not_what_it_is():
    assert tiny().train.prefetch_workers is None
    assert identity.fingerprint(tiny(WORKERS)) == identity.fingerprint(tiny())
    assert identity.differences(tiny(), tiny(WORKERS)) == []  # a resume may change it


def test_inline_batches_are_the_corpus_batches_and_time_the_making(corpus):
    batches = TrainBatches(corpus, B, L, pin=True)
    batches.start(0, 10)  # 0 workers: nothing to start
    assert not batches.running and batches.pids == [] and batches.pin is False
    for step in (0, 7, 3):  # any order
        assert_same(batches.get(step), corpus.train_batch(step, B, L))
        assert batches.wait_s > 0


def test_pin_copies_through_page_locked_memory(corpus, monkeypatch):
    """The CUDA path's flag, on the CPU (pin_memory needs a GPU: recorded instead)."""
    pinned, moves = [], []
    real_to = torch.Tensor.to

    def pin_memory(self):
        pinned.append(self.shape)
        return self.clone()

    def to(self, *args, **kwargs):
        moves.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = corpus.train_batch(0, B, L)
    ctx = Context()
    plain = local_batch(batch, ctx, torch.device("cpu"))
    assert pinned == [] and moves == [False] * 3  # the CPU path as it was
    fast = local_batch(batch, ctx, torch.device("cpu"), pin=True)
    assert pinned == [(B, L)] * 3 and moves == [False] * 3 + [True] * 3
    for a, b in zip(plain, fast, strict=True):
        assert torch.equal(a, b)


def test_the_fraction_of_time_waiting_for_input():
    loop = LoopState()
    assert input_wait_fraction(loop) is None  # no step yet
    loop.advance({"scored_tokens": 1, "input_wait_s": 0.25}, 1.0)
    loop.advance({"scored_tokens": 1, "input_wait_s": 0.25}, 1.0)
    assert input_wait_fraction(loop) == 0.25
    saved = {**loop.to_checkpoint(), "wall_time": 3.0}
    assert input_wait_fraction(LoopState.from_checkpoint(saved, torch.device("cpu"))) == 0.25
    del saved["input_wait"]  # a checkpoint from before the count: the fraction is unknown
    old = LoopState.from_checkpoint(saved, torch.device("cpu"))
    old.advance({"scored_tokens": 1, "input_wait_s": 0.25}, 1.0)
    assert input_wait_fraction(old) is None


def test_a_run_logs_its_input_wait(tmp_path):
    summary = Trainer(tiny(), tmp_path / "r").run()
    train = [r for r in rundir.read_metrics(tmp_path / "r") if r["kind"] == "train"]
    assert all(0 < r["input_wait_s"] < r["time"] for r in train)
    wait = sum(r["input_wait_s"] for r in train)
    assert summary["input_wait_fraction"] == pytest.approx(wait / summary["train_time_s"])
    assert summary["prefetch_workers"] == 0  # CPU: inline by default
    assert "input_wait_fraction" in rundir.SUMMARY_KEYS
    final = runinfo.final_metrics(summary)  # MLflow's final metrics
    assert final["input_wait_fraction"] == summary["input_wait_fraction"]


# --- integration: the workers -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_every_batch_in_order(corpus, workers):
    before = children()
    with TrainBatches(corpus, B, L, workers=workers) as batches:
        batches.start(0, 40)
        assert len(batches.pids) == workers
        for step in range(40):
            assert_same(batches.get(step), corpus.train_batch(step, B, L))
        assert_same(batches.get(40), corpus.train_batch(40, B, L))  # past the range: inline
    assert children() == before  # ended and reaped


class Wide:
    """A corpus whose batches hold twice the values a slot is sized for (they are pickled)."""

    name = "synthetic"

    def __init__(self, corpus) -> None:
        self.corpus = corpus

    def train_batch(self, step, batch_size, seq_len):
        return self.corpus.train_batch(step, batch_size, 2 * seq_len)


@pytest.mark.integration
def test_a_batch_larger_than_its_slot_comes_through_the_pipe(corpus):
    with TrainBatches(Wide(corpus), B, L, workers=2) as batches:
        batches.start(0, 6)
        for step in range(6):
            assert_same(batches.get(step), corpus.train_batch(step, B, 2 * L))


@pytest.mark.integration
def test_workers_start_at_any_step(corpus):
    with TrainBatches(corpus, B, L, workers=2) as batches:
        batches.start(17, 30)
        for step in range(17, 30):
            assert_same(batches.get(step), corpus.train_batch(step, B, L))
        batches.start(17, 30)  # again: a new set of workers
        with pytest.raises(RuntimeError, match="batch of step 18 asked for, but step 17 is next"):
            batches.get(18)  # out of order: never a wrong batch
    with TrainBatches(corpus, B, L, workers=4) as batches:
        batches.start(5, 7)  # fewer steps than workers: one worker per step
        assert len(batches.pids) == 2
        assert_same(batches.get(5), corpus.train_batch(5, B, L))


@pytest.mark.integration
def test_a_worker_that_raises_is_one_line(corpus):
    before = children()
    with TrainBatches(Failing(corpus, at=5), B, L, workers=2) as batches:
        batches.start(0, 20)
        for step in range(5):
            batches.get(step)
        pid = batches.pids[1]
        with pytest.raises(BatchWorkerError) as err:
            batches.get(5)
    assert str(err.value) == (
        f"batch worker 1 (pid {pid}) failed making the batch of step 5: ValueError: no batch for "
        "this step"
    )
    assert children() == before


@pytest.mark.integration
def test_a_killed_worker_is_named_not_waited_for(corpus):
    with TrainBatches(corpus, B, L, workers=2) as batches:
        batches.start(0, 20)
        batches.get(0)
        pid = batches.pids[1]
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(BatchWorkerError) as err:
            for step in range(1, 20):  # its batch of step 1 may be in the pipe already
                batches.get(step)
        assert time.perf_counter() - t0 < 5
    assert re.fullmatch(
        rf"batch worker 1 \(pid {pid}\) died before sending the batch of step [13] \(killed by "
        r"SIGKILL \(.*\)\); the run stopped, `--resume` continues from the last checkpoint",
        str(err.value),
    ), err.value
    assert gone(pid)


@pytest.mark.integration
def test_a_stuck_worker_times_out(corpus):
    with TrainBatches(Failing(corpus, at=2, sleep=60), B, L, workers=2, timeout_s=0.5) as batches:
        batches.start(0, 10)
        batches.get(0)
        batches.get(1)
        pid = batches.pids[0]
        with pytest.raises(
            BatchWorkerError, match=r"sent no batch for step 2 in 0.5 s: it is stuck"
        ):
            batches.get(2)
    assert gone(pid)  # closed: killed and reaped, asleep or not


@pytest.mark.integration
def test_workers_ignore_the_stop_signals(corpus):
    """Ctrl-C and a hangup reach the whole process group: the trainer decides, not the workers."""
    with TrainBatches(corpus, B, L, workers=2) as batches:
        batches.start(0, 12)
        batches.get(0)
        time.sleep(0.2)  # the workers are past their start
        for pid in batches.pids:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                os.kill(pid, signum)
        for step in range(1, 12):
            assert_same(batches.get(step), corpus.train_batch(step, B, L))


@pytest.mark.integration
def test_workers_started_outside_the_main_thread(corpus):
    got, before = [], children()

    def run():
        with TrainBatches(corpus, B, L, workers=2) as batches:
            batches.start(0, 6)
            got.extend(batches.get(step) for step in range(6))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert len(got) == 6 and children() == before
    for step, batch in enumerate(got):
        assert_same(batch, corpus.train_batch(step, B, L))


# --- integration: runs with workers -------------------------------------------------------------


@pytest.mark.integration
def test_a_run_with_workers_equals_the_inline_run(tmp_path):
    before = children()
    inline = Trainer(tiny(), tmp_path / "inline").run()
    ahead = Trainer(tiny(WORKERS), tmp_path / "ahead").run()
    assert losses(tmp_path / "ahead") == losses(tmp_path / "inline")
    assert ahead["test_perplexity"] == inline["test_perplexity"]
    assert ahead["prefetch_workers"] == 2 and 0 <= ahead["input_wait_fraction"] < 1
    assert children() == before  # no worker left after a normal run


@pytest.mark.integration
def test_killed_and_resumed_with_workers_equals_uninterrupted(tmp_path):
    before = children()
    whole = Trainer(tiny(), tmp_path / "whole").run()
    run_until_killed(Trainer(tiny(WORKERS), tmp_path / "cut"), at_step=8)
    assert children() == before  # an exception in a step ends the workers too
    assert checkpoint.latest(tmp_path / "cut").name == "step-00000005.pt"
    resumed = Trainer(tiny(WORKERS), tmp_path / "cut", resume=True).run()  # from step 5
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert resumed["test_perplexity"] == whole["test_perplexity"]
    assert children() == before


@pytest.mark.integration
def test_a_worker_death_stops_the_trainer_in_one_line(tmp_path):
    trainer = Trainer(tiny(WORKERS), tmp_path / "r")
    step = trainer.train_step

    def kills_a_worker():
        if trainer.step == 4:
            os.kill(trainer.batches.pids[(4 + 1) % 2], signal.SIGKILL)  # the one of step 5
        return step()

    trainer.train_step = kills_a_worker
    before = children()
    # its batch of step 5 may be in the pipe already: then step 7 is the one it cannot send
    with pytest.raises(BatchWorkerError, match=r"^batch worker 1 .* step [57] \(killed by SIGKILL"):
        trainer.run()
    assert children() <= before
    assert checkpoint.latest(tmp_path / "r").name == "step-00000005.pt"


# --- integration: the command, signalled or failing ---------------------------------------------

STEPS = 400  # TINY's 192 tokens per step: long enough to be signalled mid-run
LINE = re.compile(r"interrupted at step (\d+); `python -m moe_impl train --out (.+) --resume`")


def start_command(out: Path, *more: str) -> subprocess.Popen:
    overrides = [
        *TINY,
        f"train.tokens={192 * STEPS}",
        "train.progress=lines",
        "train.log_every=1",
        WORKERS,
        *more,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "moe_impl", "train", "--out", str(out), *set_args(overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal or SLURM gives it
    )


def wait_for_step(proc: subprocess.Popen, at: int) -> None:
    for line in proc.stdout:  # "NAME step 3/400 loss ..."
        found = re.search(r" step (\d+)/", line)
        if found and int(found[1]) >= at:
            return
    pytest.fail(f"the run ended before step {at}: {proc.wait()} {proc.stderr.read()}")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("group", "signum", "code"),
    [
        (False, signal.SIGTERM, 143),
        (True, signal.SIGTERM, 143),
        (True, signal.SIGINT, 130),
        (True, signal.SIGHUP, 129),
    ],
    ids=["SIGTERM", "SIGTERM-group", "SIGINT-group", "SIGHUP-group"],
)
def test_a_signal_stops_the_command_with_a_checkpoint_and_no_worker_left(
    tmp_path, group, signum, code
):
    """SIGTERM to the trainer (kill PID), or a signal to its whole process group (SLURM, Ctrl-C,
    a closed terminal): the workers ignore it, the trainer exits 128 + the signal after a
    checkpoint, with the one line and no traceback, every worker gone; --resume finishes."""
    out = tmp_path / "run"
    proc = start_command(out)
    try:
        wait_for_step(proc, 3)
        workers = children(proc.pid)
        assert len(workers) == 2
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    stopped = int(LINE.match(line)[1])
    assert checkpoint.latest(out).name == f"step-{stopped:08d}.pt"
    assert all(gone(pid) for pid in workers)
    assert (
        Trainer(
            tiny(f"train.tokens={192 * STEPS}", "train.log_every=1", WORKERS), out, resume=True
        ).run()["steps"]
        == STEPS
    )


def ended(pid: int) -> bool:
    """Gone, or a zombie that only its new parent (init) has not reaped yet: not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.integration
def test_workers_of_a_killed_trainer_end_by_themselves(tmp_path):
    """kill -9 of the trainer: its workers exit at their next write or credit wait (no orphan
    keeps running, nor holds the run directory's lock), and --resume continues the run."""
    out = tmp_path / "run"
    proc = start_command(out)
    try:
        wait_for_step(proc, 6)
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while not all(ended(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(ended(pid) for pid in workers)
    resumed = Trainer(
        tiny(f"train.tokens={192 * STEPS}", "train.log_every=1", WORKERS), out, resume=True
    ).run()
    assert resumed["steps"] == STEPS


@pytest.mark.integration
def test_a_killed_worker_stops_the_command_in_one_line(tmp_path):
    proc = start_command(tmp_path / "run")
    try:
        wait_for_step(proc, 3)
        workers = children(proc.pid)
        os.kill(min(workers), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert re.fullmatch(
        rf"error: batch worker [01] \(pid {min(workers)}\) died before sending the batch of step "
        r"\d+ \(killed by SIGKILL .*\); the run stopped, `--resume` continues from the last "
        "checkpoint",
        line,
    ), line
    assert all(gone(pid) for pid in workers)


@pytest.mark.integration  # forks workers
def test_an_error_while_a_batch_is_copied_out_still_closes_every_worker(monkeypatch):
    """A second signal (or a MemoryError) raised while a batch is copied out of a worker's slot:
    the run's own error comes out of close(), not a BufferError, and every worker is reaped."""
    corpus = TopicMarkov(TopicMarkovConfig(vocab_size=48, num_topics=4, max_len=40))

    class SecondSignal(KeyboardInterrupt):
        pass

    def copy_fails(slot, layout):
        dtype, shape, offset = layout[0]
        view = np.frombuffer(slot, dtype=dtype, count=int(np.prod(shape)), offset=offset)
        raise SecondSignal(view.size)  # raised with a view of the slot alive in this frame

    monkeypatch.setattr(prefetch, "_from_slot", copy_fails)
    batches = TrainBatches(corpus, 4, 16, workers=2)
    batches.start(0, 10)
    pids = batches.pids
    with pytest.raises(SecondSignal):
        try:
            batches.get(0)
        finally:
            batches.close()  # what Trainer._train's finally does
    assert not batches.running
    for pid in pids:  # reaped: no zombie, no process left
        assert not Path(f"/proc/{pid}").exists()
