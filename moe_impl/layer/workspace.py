"""Memory the expert bank reuses across training steps: the buffers of its large tensors.

Why: a step of the layer allocates tens to hundreds of MB of short-lived tensors (the rows of the
dispatch buffer, the experts' hidden activations, their gradients) and the experts' weight
gradients (E x 2·d·h values dense, or one per active expert sparse: 32 MB each at 1024 experts of
64 x 128, 128 MB at 4096). glibc serves large allocations with mmap (from 128 KB up to 32 MB, as its
threshold adapts) and returns them to the kernel when they are freed, so a step that allocates them
afresh page-faults through all of that memory again: 4096-h at 4096 tokens took 1.5x as long, and
a relu' on 8 MB took 4.5 ms instead of 0.7 (docs/performance.md). `moe_impl.runtime.tune_allocator`
avoids that for a whole process, but a library's speed must not depend on its caller's allocator.

How: the bank keeps one buffer per use (a name) and writes the next step's tensor of that use into
it. It reuses a buffer only when nothing holds its memory any more (the storage's reference count is
back to the buffer's own): the activations once backward has run (or the graph was dropped), the
weight gradients once they are set to None after the optimizer's step, as every training loop does.
While anything holds it (a graph not yet backpropagated, a second forward before the backward,
`param.grad` while gradients accumulate over micro-batches, a view or reference a user kept), the
tensor goes into fresh memory, so nothing is ever overwritten. Where torch offers no storage
reference count, nothing is reused.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_use_count = getattr(torch._C, "_storage_Use_Count", None)
# A buffer is 1 + 1/HEADROOM times its first request, so that sparse gradients, whose size follows
# the active experts from step to step, keep fitting.
HEADROOM = 8


class Workspace:
    """Per-name buffers; `take` returns an uninitialised tensor of a shape, in its buffer if free."""

    def __init__(self) -> None:
        self._bufs: dict[str, tuple[Tensor, object, int]] = {}  # name -> (buffer, storage, refs)
        # threads sharing a module (nn.DataParallel's replicas share this object) must not both
        # find a buffer free before either holds it
        self._lock = threading.Lock()

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of `shape` with like's dtype and device, in name's buffer when it is free."""
        with self._lock:
            return self._take(name, tuple(shape), like)

    def _take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        entry = self._bufs.get(name)
        if entry is not None and self._free(entry, numel, like):
            return entry[0][:numel].view(shape)
        if _use_count is None:
            return like.new_empty(shape)
        buf = like.new_empty(numel + numel // HEADROOM)
        storage = buf.untyped_storage()  # kept, so that the count below stays the baseline
        self._bufs[name] = (buf, storage, _use_count(storage._cdata))
        return buf[:numel].view(shape)

    @staticmethod
    def _free(entry: tuple[Tensor, object, int], numel: int, like: Tensor) -> bool:
        buf, storage, refs = entry
        if buf.dtype != like.dtype or buf.device != like.device or buf.numel() < numel:
            return False
        return _use_count(storage._cdata) <= refs

    def clear(self) -> None:
        self._bufs.clear()

    # Neither pickled nor copied with the module: buffers are scratch memory, not state.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()


def empty(workspace: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of `shape` like `like`: from `workspace` where there is one."""
    if workspace is None:
        return like.new_empty(shape)
    return workspace.take(name, shape, like)
