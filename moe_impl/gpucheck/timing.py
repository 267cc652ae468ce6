"""Timing a step on the device: warm-ups, then the median and min of timed repetitions, each
bracketed by device synchronisation (wall clock: it holds for CPU and GPU alike)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object], device: torch.device, *, warmup: int, reps: int
) -> dict[str, float]:
    """Seconds per call of `step`: {"median_s", "min_s"} over `reps` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def time_first_steps(step: Callable[[], object], device: torch.device, steps: int) -> float:
    """Seconds the first `steps` calls of `step` take together (a compile happens in them)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError | MemoryError) or "out of memory" in text
