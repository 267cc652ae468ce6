"""Training batches made ahead of the step by worker processes (issue 28), or inline.

A batch is a pure function of its step (moe_impl/data/base.py), so it can be made before the step
that trains on it, by another process, and the run stays exactly the one of inline generation:
`TrainBatches.get(s)` is `corpus.train_batch(s, batch_size, seq_len)`, bit for bit, whichever
way it was made.

**Workers.** `start(step, stop)` forks `workers` processes. Worker w makes the batches of steps
step + w, step + w + W, ... (W workers) in that order, so the trainer takes step s from worker
(s - step) mod W and the order needs no reassembly; a resumed run simply starts at its
checkpoint's step. A worker writes each batch's arrays into its own shared-memory slot (an
anonymous shared mapping made before the fork) and sends a small message saying where they lie;
the trainer copies them out, and only then lets the worker make its next batch (a credit byte on a
second pipe). So each worker is at most one batch ahead, W batches in all, whatever a batch's
size: the queue is bounded. A batch too large for its slot (slots are sized for 8-byte values) is
pickled through the pipe instead. The child is a fork: it shares the corpus's numpy tables
copy-on-write, never pickles the corpus, and runs only numpy (torch is never called in it:
forking a process that uses CUDA is safe as long as the child does not).

**Which corpora.** Only the synthetic corpus is made by workers (`PREFETCHED_CORPORA`): its batch
is numpy work (a counter-based RNG and a table walk per token). LM1B and text batches are windows
of one int32 array (a fancy index), which cost about what handing one over does; they stay inline
whatever `train.prefetch_workers` says. `resolve_workers` picks the count:
`train.prefetch_workers`, or, when it is null, 2 on CUDA and 0 (inline) on CPU, where a worker
would take CPU time from the training steps of the runs that already share the cores
(docs/training.md, "Batches made ahead", has the measurements).

**Signals and shutdown.** A worker ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C and
hangup reach the whole process group; SLURM signals every process of a step): the trainer alone
decides to stop, finishes its step and checkpoints (interrupt.py), and `close` then ends the
workers with SIGKILL and reaps them, so no traceback is printed, none lingers and none is left a
zombie. A trainer that dies without closing (kill -9) leaves its workers to end by themselves: a
worker's next write to its pipe fails (EPIPE: nobody holds the reading end any more), or its wait
for a credit reads the end of the file, and it exits.

**Failures.** A worker whose `train_batch` raises sends the error, and `get` raises it as a
one-line `BatchWorkerError` naming the worker, its pid and the step. A worker that dies (killed,
out of memory) closes its pipe: `get` reaps it and says how it died. A live worker that sends
nothing for `timeout_s` is named as stuck. None of these hangs the trainer.

**Pinned memory.** `pin` (the trainer sets it on CUDA when workers make the batches) asks
`local_batch` (corpus.py) to copy the rows through page-locked memory with non-blocking copies;
the CPU path is unchanged.

`wait_s` is how long the last `get` waited (inline: how long the batch took to make), what the
trainer logs as `input_wait_s`. Torch-free.
"""

from __future__ import annotations

import contextlib
import gc
import math
import mmap
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from moe_impl import runtime
from moe_impl.data.base import Batch, Corpus

# corpora whose batches pay for a worker (numpy work); the others read windows of an array
PREFETCHED_CORPORA = frozenset({"synthetic"})
AUTO_WORKERS_CUDA = 2  # train.prefetch_workers=null on CUDA (docs/training.md's measurements)
TIMEOUT_S = 600.0  # a live worker that sends no batch for this long is stuck
# what a worker ignores: the trainer alone stops the run (interrupt.py's SIGNALS)
_SIGNALS = tuple(
    s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None
)
_ALIGN = 64  # each array of a slot starts at a multiple of this many bytes
# a worker's priority below the trainer's: the credit that wakes it must not preempt the trainer
# on its own core (docs/training.md, "Batches made ahead", has the measurement); it still gets
# every core the trainer leaves idle
_NICE = 5


class BatchWorkerError(ValueError):
    """A batch worker failed, died or got stuck: one line naming it (a ValueError, so the CLI
    prints it without a traceback and exits 2); `--resume` continues from the last checkpoint."""


def resolve_workers(setting: int | None, corpus_name: str, device_type: str) -> int:
    """Worker processes a run uses: 0 (inline) for a corpus not in PREFETCHED_CORPORA, else
    `setting` (train.prefetch_workers), or, when that is None, AUTO_WORKERS_CUDA on CUDA (at most
    the CPUs the process may run on) and 0 on CPU."""
    if corpus_name not in PREFETCHED_CORPORA or not hasattr(os, "fork"):  # (Windows has none)
        return 0
    if setting is None:
        return min(AUTO_WORKERS_CUDA, runtime.usable_cpus()) if device_type == "cuda" else 0
    return setting


def slot_bytes(batch_size: int, seq_len: int) -> int:
    """A slot's size: the four arrays of a Batch at 8 bytes a value, each aligned."""
    return 4 * (8 * batch_size * seq_len + _ALIGN)


@dataclass
class _Job:
    """What one worker makes, and where it puts it."""

    corpus: Corpus
    batch_size: int
    seq_len: int
    steps: range  # in order
    slot: mmap.mmap  # shared with the parent: the arrays of the batch being handed over


@dataclass
class _Worker:
    """The parent's handle on one worker: its pid (None once reaped), the reading end of its
    message pipe, the writing end of its credit pipe (a byte per batch it may make next), and its
    job."""

    pid: int | None
    pipe: Connection
    credit: int
    job: _Job


class TrainBatches:
    """The training batches of a run, by step: inline, or from worker processes between `start`
    and `close` (a context manager closes too)."""

    def __init__(
        self,
        corpus,
        batch_size: int,
        seq_len: int,
        *,
        workers: int = 0,
        pin: bool = False,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
        self.workers, self.timeout_s = workers, timeout_s
        self.pin = pin and workers > 0  # local_batch's flag: pinned, non-blocking copies
        self.wait_s = 0.0  # seconds the last get waited for its batch
        self._running: list[_Worker] = []
        self._first = self._next = self._stop = 0

    @property
    def running(self) -> bool:
        return bool(self._running)

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers not yet reaped, in worker order."""
        return [w.pid for w in self._running if w.pid is not None]

    def start(self, step: int, stop: int) -> None:
        """Fork the workers for steps step .. stop - 1 (nothing with 0 workers or no steps)."""
        self.close()
        if self.workers < 1 or step >= stop:
            return
        self._first = self._next = step
        self._stop = stop
        try:
            for w in range(min(self.workers, stop - step)):
                steps = range(step + w, stop, self.workers)
                slot = mmap.mmap(-1, slot_bytes(self.batch_size, self.seq_len))
                self._fork(_Job(self.corpus, self.batch_size, self.seq_len, steps, slot))
        except BaseException:
            self.close()
            raise

    def get(self, step: int) -> Batch:
        """The batch of training step `step` (the next one in order while workers run)."""
        t0 = time.perf_counter()
        try:
            if self.running and step < self._stop:
                return self._receive(step)
            return self.corpus.train_batch(step, self.batch_size, self.seq_len)
        finally:
            self.wait_s = time.perf_counter() - t0

    def close(self) -> None:
        """End and reap every worker (SIGKILL: they hold nothing worth finishing); idempotent."""
        workers, self._running = self._running, []
        for worker in workers:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
        for worker in workers:  # reaped first: nothing below may leave one a zombie
            if worker.pid is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
            worker.pipe.close()
            os.close(worker.credit)
            with contextlib.suppress(BufferError):  # a view of it still alive: freed with it
                worker.job.slot.close()

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the parent's side ----------------------------------------------------------------------

    def _fork(self, job: _Job) -> None:
        """One worker for `job`. Signals are blocked across the fork, so that none reaches the
        child before it ignores them (the parent gets any that came meanwhile afterwards)."""
        reader, writer = multiprocessing.Pipe(duplex=False)
        credit_r, credit_w = os.pipe()
        # the parent's ends, which the child closes: a dead parent is then EOF or EPIPE to it
        ours = [reader, credit_w, *(x for w in self._running for x in (w.pipe, w.credit))]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            with warnings.catch_warnings():  # Python >= 3.12 warns of forking with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: never returns
                _child(job, writer, credit_r, ours, blocked)
        except BaseException:
            reader.close()
            os.close(credit_w)
            job.slot.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            writer.close()  # the child's ends: EOF / EPIPE on ours once the child is gone
            os.close(credit_r)
        self._running.append(_Worker(pid, reader, credit_w, job))

    def _receive(self, step: int) -> Batch:
        if step != self._next:  # the trainer asks in order; anything else is a bug, not a batch
            raise RuntimeError(f"batch of step {step} asked for, but step {self._next} is next")
        w = (step - self._first) % self.workers
        worker = self._running[w]
        name = f"batch worker {w} (pid {worker.pid})"
        if not worker.pipe.poll(self.timeout_s):
            raise BatchWorkerError(
                f"{name} sent no batch for step {step} in {self.timeout_s:g} s: it is stuck; "
                f"{_STOPPED}"
            )
        try:
            kind, sent_step, payload = worker.pipe.recv()
        except (EOFError, OSError):
            raise BatchWorkerError(
                f"{name} died before sending the batch of step {step} ({self._reap(worker)}); "
                f"{_STOPPED}"
            ) from None
        if kind == "error":
            raise BatchWorkerError(f"{name} failed making the batch of step {sent_step}: {payload}")
        if sent_step != step:
            raise RuntimeError(f"{name} sent step {sent_step} for step {step}")
        batch = _from_slot(worker.job.slot, payload) if kind == "slot" else payload
        if step + self.workers < self._stop:  # it has more to make: the slot is free again
            with contextlib.suppress(OSError):  # dead meanwhile: its next batch will say so
                os.write(worker.credit, b"\x01")
        self._next = step + 1
        return batch

    def _reap(self, worker: _Worker) -> str:
        """Reap a worker whose pipe closed, and say how it ended."""
        pid, worker.pid = worker.pid, None
        if pid is None:
            return "it had ended before"
        for _ in range(100):  # its pipe closed as it exited: the exit status follows at once
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return _status(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "it closed its pipe and was ended"


_STOPPED = "the run stopped, `--resume` continues from the last checkpoint"


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        why = " (as the kernel's out-of-memory killer does)" if name == "SIGKILL" else ""
        return f"killed by {name}{why}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


# --- a batch in a slot: (dtype, shape, offset) per field, None for a field that is None ---------


def _to_slot(slot: mmap.mmap, batch: Batch) -> list | None:
    """Copy the batch's arrays into the slot; where they lie, or None when they do not fit."""
    layout: list[tuple[str, tuple[int, ...], int] | None] = []
    offset = 0
    arrays: list[tuple[np.ndarray, int]] = []
    for array in batch:
        if array is None:
            layout.append(None)
            continue
        array = np.ascontiguousarray(array)
        if offset + array.nbytes > len(slot):
            return None
        layout.append((array.dtype.str, array.shape, offset))
        arrays.append((array, offset))
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    for array, at in arrays:
        view = np.frombuffer(slot, dtype=array.dtype, count=array.size, offset=at)
        view[:] = array.reshape(-1)
        del view
    return layout


def _from_slot(slot: mmap.mmap, layout: list) -> Batch:
    """A copy of the batch the slot holds (the worker may overwrite the slot afterwards)."""
    arrays: list[Any] = []  # the Batch's fields: arrays, None where the batch's is None
    for field in layout:
        if field is None:
            arrays.append(None)
            continue
        dtype, shape, offset = field
        # no name holds the view: an exception during the copy must not keep an export of the
        # slot alive in its traceback (close() could then not close the slot)
        arrays.append(
            np.frombuffer(slot, dtype=dtype, count=math.prod(shape), offset=offset)
            .reshape(shape)
            .copy()
        )
    return Batch(*arrays)


# --- the worker's side ------------------------------------------------------------------------


def _child(job: _Job, writer: Connection, credit: int, ours: list, mask) -> None:
    """The forked worker: ignore the stop signals, lower its priority (_NICE), leave the parent's
    objects out of garbage collection (gc.freeze: their copy-on-write pages stay shared), close
    the parent's ends of every pipe (so that a dead parent is EOF or EPIPE here, never a wait),
    make and send the batches, exit without Python's exit handlers (they are the parent's) and
    without a traceback."""
    code = 0
    try:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        gc.freeze()  # the parent's objects: a collection here must not copy their pages
        with contextlib.suppress(OSError):
            os.nice(_NICE)
        for end in ours:
            if isinstance(end, Connection):
                end.close()
            else:
                os.close(end)
        _produce(job, writer, credit)
    except BaseException:  # a broken pipe (the trainer is gone) or anything else: just go
        code = 1
    finally:
        os._exit(code)


def _produce(job: _Job, writer: Connection, credit: int) -> None:
    """Make each step's batch in order, each once the parent took the one before (a byte on
    `credit`; EOF: the parent is gone), and send ("slot", step, layout), or ("batch", step,
    Batch) for one too large for the slot; on an error ("error", step, one line) and stop."""
    for i, step in enumerate(job.steps):
        if i and not os.read(credit, 1):
            return
        try:
            batch = job.corpus.train_batch(step, job.batch_size, job.seq_len)
            layout = _to_slot(job.slot, batch)
        except Exception as err:
            writer.send(("error", step, _one_line(err)))
            return
        writer.send(("batch", step, batch) if layout is None else ("slot", step, layout))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
