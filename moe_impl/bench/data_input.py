"""`python -m moe_impl bench --data`: the training input's speed, the trainer's path against a
reference generator, and whether they give the same batches (the CLI wiring: moe_impl/cli/bench.py).

A path is a function of the steps that yields one batch per step, in order (an iterator, so that a
producer that works ahead in the background times as the trainer sees it: the wait for each next
batch). Each path runs alone over the same steps; the trainer's batches are kept, and every array
of every reference batch is compared with them (values, dtype and shape) outside the timing. A
batch is any tuple of numpy arrays (moe_impl/data/base.py's Batch); nothing here imports a corpus.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

BatchPath = Callable[[range], Iterator[tuple]]  # steps -> their batches, in order


def timed(batches: Iterable[tuple]) -> Iterator[tuple[float, tuple]]:
    """(seconds the iterator took to give it, batch) for each batch."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


def same_array(x: np.ndarray | None, y: np.ndarray | None) -> bool:
    """Equal in shape, dtype and values (a batch never holds NaN), or both None."""
    if x is None or y is None:
        return x is None and y is None
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def same_batch(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_array(x, y) for x, y in zip(a, b, strict=True))


def summary(seconds: list[float], tokens_per_batch: int) -> dict:
    """Milliseconds per batch (median, min, mean) and tokens per second at the median."""
    median = statistics.median(seconds)
    return {
        "ms_per_batch": median * 1e3,
        "ms_per_batch_min": min(seconds) * 1e3,
        "ms_per_batch_mean": statistics.fmean(seconds) * 1e3,
        "tokens_per_s": tokens_per_batch / median,
    }


def compare(trainer: BatchPath, reference: BatchPath, steps: range, tokens_per_batch: int) -> dict:
    """Both paths over `steps`, the trainer's first: its timings, the reference's, the speedup of
    the trainer's (tokens per second, at the medians) and `identical`."""
    trainer_times, kept = [], []
    for seconds, batch in timed(trainer(steps)):
        trainer_times.append(seconds)
        kept.append(batch)
    reference_times, identical = [], len(kept) == len(steps)
    for i, (seconds, batch) in enumerate(timed(reference(steps))):
        reference_times.append(seconds)
        identical = identical and i < len(kept) and same_batch(batch, kept[i])
        if i < len(kept):
            kept[i] = None  # type: ignore[call-overload]  # free it once compared (never read again)
    identical = identical and len(reference_times) == len(steps)
    paths = {
        "reference": summary(reference_times, tokens_per_batch),
        "trainer": summary(trainer_times, tokens_per_batch),
    }
    speedup = paths["trainer"]["tokens_per_s"] / paths["reference"]["tokens_per_s"]
    return {"paths": paths, "speedup": speedup, "identical": identical}


def format_table(result: dict) -> str:
    """The short table `bench --data` prints."""
    lines = [f"{'path':<10} {'ms/batch':>10} {'min ms':>9} {'tokens/s':>13}"]
    for name, row in result["paths"].items():
        lines.append(
            f"{name:<10} {row['ms_per_batch']:>10.1f} {row['ms_per_batch_min']:>9.1f} "
            f"{row['tokens_per_s']:>13,.0f}"
        )
    identical = "true" if result["identical"] else "FALSE"
    lines.append(f"speedup {result['speedup']:.1f}x, identical: {identical}")
    return "\n".join(lines)
