"""Training progress for people: a tqdm bar in a terminal, a plain line every log_every steps in
logs (Snakemake, SLURM), or nothing. Mode "auto" picks the bar when stderr is a terminal.

Progress never ends a run: a line that cannot be written (a closed terminal: EIO, which a hangup
gives before its SIGHUP is handled; a pipe nobody reads: EPIPE) turns the lines off; tqdm turns its
bar off itself on EIO."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str, total: int, start: int, name: str, every: int = 10) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.name, self.every = mode, total, name, every
        self.t0 = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0 or step == self.total:
                self.bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}"
                )
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            self._line(
                f"{self.name} step {step}/{self.total} loss {record['loss']:.4f} "
                f"aux {record['aux_loss']:.4f} tokens/s {record['tokens_per_second']:.0f} "
                f"elapsed {time.perf_counter() - self.t0:.0f}s"
            )

    def _line(self, text: str) -> None:
        try:
            print(text, flush=True)
        except OSError:  # nobody can read it any more: no more lines, the run goes on
            self.mode = "none"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
