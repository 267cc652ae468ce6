"""Memory the expert bank reuses across training steps: the buffers of its large tensors.

Why: a step of the layer allocates tens to hundreds of MB of short-lived tensors (the rows of the
dispatch buffer, the experts' hidden activations, their gradients) and the experts' weight
gradients (E x 2·d·h values dense, or one per active expert sparse: 32 MB each at 1024 experts of
64 x 128, 128 MB at 4096). glibc serves large allocations with mmap (from 128 KB up to 32 MB, as its
threshold adapts) and returns them to the kernel when they are freed, so a step that allocates them
afresh page-faults through all of that memory again: 4096-h at 4096 tokens took 1.5x as long, and
a relu' on 8 MB took 4.5 ms instead of 0.7 (docs/performance.md). `moe_impl.runtime.tune_allocator`
avoids that for a whole process, but a library's speed must not depend on its caller's allocator.

How: the bank keeps a pool of buffers and writes each large tensor of a step into the smallest free
one that fits (a new one where none does). A buffer is free only when nothing holds its memory any
more (the storage's reference count is back to the buffer's own): the activations once backward has run (or the graph was dropped), the
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
# A buffer serves a use of at least 1/MAX_WASTE of its size: a small temporary must not take (and
# hold) the memory a large one, a weight gradient say, is about to need.
MAX_WASTE = 4


class Workspace:
    """A pool of buffers; `take` returns an uninitialised tensor of a shape in the smallest free
    buffer that fits (best fit), else in a new one. Uses whose lifetimes do not overlap (a forward
    temporary and a backward one) share memory, so the pool holds about the step's largest set of
    tensors alive at once, as the allocator would at its peak, not one buffer per use."""

    def __init__(self) -> None:
        # (buffer, its storage, baseline refs)
        self._bufs: list[tuple[Tensor, torch.UntypedStorage, int]] = []
        # threads sharing a module (nn.DataParallel's replicas share this object) must not both
        # find a buffer free before either holds it
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of `shape` with like's dtype and device, in a free buffer of the pool where one
        fits, else in a new one added to the pool."""
        with self._lock:
            return self._take(tuple(shape), like)

    def _take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        if _use_count is None:
            return like.new_empty(shape)
        best = None
        too_small = []
        for entry in self._bufs:
            buf = entry[0]
            if buf.dtype != like.dtype or buf.device != like.device or not _free(entry):
                continue
            if buf.numel() < numel:
                too_small.append(entry)
            elif buf.numel() <= MAX_WASTE * numel and (
                best is None or buf.numel() < best[0].numel()
            ):
                best = entry
        if best is not None:
            return best[0][:numel].view(shape)
        # a free buffer too small for this use would only grow the pool: give it back first
        self._bufs = [e for e in self._bufs if not any(e is t for t in too_small)]
        buf = like.new_empty(numel + numel // HEADROOM)
        storage = buf.untyped_storage()  # kept, so that the count below stays the baseline
        self._bufs.append((buf, storage, _use_count(storage._cdata)))
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Give every buffer back (those in use stay alive with their holders)."""
        with self._lock:
            self._bufs = []

    # Neither pickled nor copied with the module: buffers are scratch memory, not state.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]  # a fresh, empty pool (mypy: __init__ on an instance)

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()


def _free(entry: tuple[Tensor, torch.UntypedStorage, int]) -> bool:
    """Whether nothing but the pool holds the buffer's memory (no view, no tensor, no storage)."""
    _, storage, refs = entry
    assert _use_count is not None  # a pool holds buffers only where torch counts references
    return _use_count(storage._cdata) <= refs


def empty(workspace: Workspace | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of `shape` like `like`: from `workspace` where there is one."""
    if workspace is None:
        return like.new_empty(shape)
    return workspace.take(shape, like)


def mm(workspace: Workspace | None, a: Tensor, b: Tensor) -> Tensor:
    """a @ b (2-D), written into `workspace` memory where there is one."""
    return torch.mm(a, b, out=empty(workspace, (a.shape[0], b.shape[1]), a))


def bmm(workspace: Workspace | None, a: Tensor, b: Tensor) -> Tensor:
    """a @ b (batched), written into `workspace` memory where there is one."""
    return torch.bmm(a, b, out=empty(workspace, (a.shape[0], a.shape[1], b.shape[2]), a))
