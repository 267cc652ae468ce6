"""Where one step's time goes: torch.profiler's per-op averages turned into a table whose shares add
up to the step.

The rule (PROFILE_RULE, written into the report): each unit of time is counted once. On a GPU the
rows are the device time of the kernels themselves (kernels, memcpys and memsets: the events on the
device; an op's own "self device time" repeats its kernels', so ops are not counted, and neither
are user annotations); on a CPU they are the ops' self time (an op's time minus its children's).
Beside the largest rows, one row gathers the other kernels (ops), and one the step's time that none
of them covers: the device idle or waiting for the host (the Python between ops). Each share is
the row's time over the wall time of the profiled step, so the shares add up to 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moe_impl.gpucheck.timing import sync

PROFILE_RULE = (
    "each unit of time counted once: on a GPU the device time of the kernels (memcpys and "
    "memsets included, ops and annotations not), on a CPU each op's self time; two rows add "
    "the other kernels and the time none covers (device idle, host work); shares are over the "
    "profiled step's wall time and add up to 1"
)
OTHER = "(other kernels / ops)"
UNCOVERED = "(no kernel / op: device idle or host)"


def leaf_times(events: Iterable[Any], cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of what PROFILE_RULE counts, from key_averages() entries."""
    out = []
    for e in events:
        on_device = e.device_type.name != "CPU"
        if cuda:
            if not on_device or getattr(e, "is_user_annotation", False):
                continue
            us = e.self_device_time_total
        else:
            if on_device:
                continue
            us = e.self_cpu_time_total
        if us > 0:
            out.append((e.key, e.count, float(us)))
    return out


def share_table(
    events: Iterable[Any], step_us: float, steps: int, cuda: bool, rows: int = 15
) -> list[dict]:
    """The `rows` largest of leaf_times per step, then the other and the uncovered rows; shares of
    `step_us` (the wall time of one step, in µs), which add up to 1 (the uncovered row is 0, not
    negative, where kernels on several streams overlap)."""
    leaves = sorted(leaf_times(events, cuda), key=lambda t: t[2], reverse=True)
    per_step = step_us * steps

    def row(name: str, calls: float, us: float) -> dict:
        return {
            "op": name[:60],
            "calls_per_step": calls / steps,
            "ms_per_step": us / steps / 1e3,
            "share": us / per_step if per_step > 0 else 0.0,
        }

    table = [row(*leaf) for leaf in leaves[:rows]]
    rest = leaves[rows:]
    table.append(row(OTHER, sum(c for _, c, _ in rest), sum(us for _, _, us in rest)))
    covered = sum(us for _, _, us in leaves)
    table.append(row(UNCOVERED, 0, max(0.0, per_step - covered)))
    return table


def profile_step(
    step: Callable[[], object], device: torch.device, rows: int = 15, steps: int = 3
) -> list[dict]:
    """share_table of `steps` profiled steps after one warm-up."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return share_table(prof.key_averages(), wall_us / steps, steps, cuda, rows)
