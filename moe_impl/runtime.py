"""Process-level settings that make CPU runs faster; called by the CLI entry points, never on import.

glibc serves allocations above its mmap threshold (at most 32 MB by default) with fresh mmap'd pages
and unmaps them on free, so every step pays page faults again for each large temporary (a 4096-expert
layer's weight gradient is 134 MB per matrix: ~40 ms of faults per step on our machine). Raising the
mmap and trim thresholds keeps freed memory in the heap for reuse. Measured with
`python -m moe_impl bench` (see README, performance section).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in glibc's heap. Returns False where it does not apply (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 62) == 1
    except (OSError, AttributeError):
        return False
