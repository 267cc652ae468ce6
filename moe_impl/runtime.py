"""Process-level settings that make CPU runs faster; called by the CLI and the trainer, not on
import.

glibc returns large freed blocks to the kernel (mmap'd allocations above 32 MB are unmapped, and the
heap top is trimmed), so every training step page-faults again on each large temporary (at 131072
experts the gathered expert weights and their gradients are ~0.5 GB per step). Serving all
allocations from the heap and never trimming it keeps those pages; the process then keeps its peak
memory until it exits, which suits a training or benchmark process. The MoE layers do not need
it: their expert bank reuses the memory of its large tensors across steps
(moe_impl/layer/workspace.py), so a plain `import moe_impl` runs them as fast; the rest of a
process (the LSTMs, a dense FFN) gains from it. docs/performance.md has the measurements.

Subnormal floats (|x| < 1.2e-38 in float32) cost 10-100x a normal one in the CPU's arithmetic. The
load loss's normal CDF (Eq. 9) has the gradient exp(-z²/2), which underflows into that range as
the gates grow sure of themselves, so they are flushed to zero (docs/sizing.md measured the
slowdown). The values lost are below 1.2e-38: no gradient the optimizer could use.

Threads: a process may run on the CPUs of its affinity mask (taskset, a SLURM allocation, a
container's cpuset), fewer than the machine has. More torch threads than those only wait for each
other (5000 on two CPUs crawled), and tens of thousands exhaust the process table and crash
(100000: a segfault), so `check_threads` refuses a count above `usable_cpus()`, naming the setting.
The cap is per process: processes that share CPUs (torchrun's, on one node) divide them themselves,
as the workflow does (threads_per_run // gpus_per_run). It is checked where the threads are set, not
in the config, which is also read on other machines (a login node, a resume on a smaller one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int: larger values would wrap around


def tune_allocator(top_pad: int = 256 * 2**20) -> bool:
    """Keep freed memory in glibc's heap for reuse. False where it does not apply (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _INT_MAX),
        (_M_TOP_PAD, min(top_pad, _INT_MAX)),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)


def flush_denormals() -> bool:
    """Treat subnormal floats as zero in the CPU arithmetic of the calling thread, the one that
    runs a CPU training step's forward and backward (FTZ/DAZ). False where the CPU cannot."""
    import torch  # here, so that importing this module loads no torch (tests/test_imports.py)

    return torch.set_flush_denormal(True)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, else (no affinity: macOS) the count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(key: str, threads: int | None) -> None:
    """ValueError naming `key` when `threads` is above usable_cpus(); None (torch's default) is
    fine."""
    cpus = usable_cpus()
    if threads is not None and threads > cpus:
        raise ValueError(
            f"{key} must be at most {cpus}, the CPUs this process may run on (its affinity: "
            f"taskset, SLURM, a container), got {threads}"
        )
