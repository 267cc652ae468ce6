"""Stopping a run cleanly on SIGTERM, SIGINT or SIGHUP (what `timeout`, SLURM, Ctrl-C and a closed
terminal or ssh session send).

`StopSignals` (a context manager, entered by Trainer.run) replaces the SIGTERM, SIGINT and SIGHUP
handlers with one that only records the signal. The training loop then finishes the step it is in,
writes a checkpoint at that step and raises `TrainingInterrupted`: the MLflow run ends as KILLED,
and the CLI prints the exception's one line and exits 128 + the signal number (143 for SIGTERM, 130
for SIGINT, 129 for SIGHUP). A second signal before that raises `TrainingInterrupted` at once,
wherever the process is, after putting the previous handlers back (a third one then acts as it
would without the trainer). Leaving the context restores the previous handlers: the Trainer is also
a library. Python installs handlers only in the main thread; elsewhere the context does nothing.
docs/training.md.

A hangup closes the terminal that stdout and stderr may be on: every later write to it fails (EIO;
EPIPE for a pipe whose reader died with the session). From a SIGHUP on, for the rest of the
process, sys.stdout and sys.stderr drop a write that fails and point their descriptor at /dev/null
(`_Forgiving`), so that neither a progress line nor the last message stops the checkpoint or the
exit; a stream that still works (a log file) is written as before. A SIGHUP that the process was
started ignoring (`nohup`) stays ignored: the run outlives its terminal, as asked.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

SIGHUP = getattr(signal, "SIGHUP", None)  # (none on Windows)
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, SIGHUP) if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """A SIGTERM, SIGINT or SIGHUP stopped the run: `step` steps were done; `checkpoint` is the one
    written at that step, or None when a second signal stopped the run at once (then `--resume`
    continues from the last checkpoint before). A KeyboardInterrupt, so code that handles Ctrl-C
    handles it; `exit_code` is the shell's 128 + signal number."""

    def __init__(
        self,
        signum: int,
        step: int | None = None,
        run_dir: str | Path | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__(signum)
        self.signum, self.step, self.run_dir, self.checkpoint = signum, step, run_dir, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self) -> str:
        resume = f"`python -m moe_impl train --out {shlex.quote(str(self.run_dir))} --resume`"
        if self.checkpoint is not None:
            return f"interrupted at step {self.step}; {resume} continues"
        return (
            f"interrupted at step {self.step} by a second signal, without a checkpoint at that "
            f"step; {resume} continues from the last checkpoint"
        )


class StopSignals:
    """Records the first SIGTERM / SIGINT / SIGHUP (`signum`) for the loop to stop after its step;
    raises TrainingInterrupted on the second. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signum == SIGHUP and signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # nohup: started to outlive its terminal
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if signum == SIGHUP:
            _forgive_std_streams()  # the terminal may be gone: its writes fail from now on
        if self.signum is None:
            self.signum = signum  # the loop stops after this step
            return
        self.restore()
        raise TrainingInterrupted(signum)  # the second: at once

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            # None: a handler installed from outside Python, which cannot be put back
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class _Forgiving:
    """A standard stream after a hangup: a write or flush that fails (a closed terminal: EIO; a pipe
    nobody reads: EPIPE) is dropped, and the stream's descriptor is pointed at /dev/null, so that
    nothing else fails on it either (a copy of the stream kept by tqdm or logging, the
    interpreter's last flush). Everything else is the stream's own."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _to_devnull(self) -> None:
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # no descriptor (io.UnsupportedOperation is both)
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _forgive_std_streams() -> None:
    """Wrap sys.stdout and sys.stderr in `_Forgiving`, for the rest of the process: the CLI prints
    the run's last line after the run has returned."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Forgiving):
            setattr(sys, name, _Forgiving(stream))
