"""Stopping a run cleanly on SIGTERM or SIGINT (what `timeout`, SLURM and Ctrl-C send).

`StopSignals` (a context manager, entered by Trainer.run) replaces the SIGTERM and SIGINT handlers
with one that only records the signal. The training loop then finishes the step it is in, writes a
checkpoint at that step and raises `TrainingInterrupted`: the MLflow run ends as KILLED, and the CLI
prints the exception's one line and exits 128 + the signal number (143 for SIGTERM, 130 for
SIGINT). A second signal before that raises `TrainingInterrupted` at once, wherever the process is,
after putting the previous handlers back (a third one then acts as it would without the trainer).
Leaving the context restores the previous handlers: the Trainer is also a library. Python installs
handlers only in the main thread; elsewhere the context does nothing. docs/training.md.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT stopped the run: `step` steps were done; `checkpoint` is the one written
    at that step, or None when a second signal stopped the run at once (then `--resume` continues
    from the last checkpoint before). A KeyboardInterrupt, so code that handles Ctrl-C handles it;
    `exit_code` is the shell's 128 + signal number."""

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
    """Records the first SIGTERM / SIGINT (`signum`) for the loop to stop after its step; raises
    TrainingInterrupted on the second. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
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
