"""Memory the expert bank reuses across training steps: its weight gradients' buffers.

Why: the experts' weight gradients are the largest tensors a step allocates (E x 2·d·h values
dense, or one per active expert sparse: 32 MB each at 1024 experts of 64 x 128, 128 MB at 4096).
glibc serves allocations of 32 MB and more with mmap and returns them to the kernel when they are
freed, so a step that allocates them afresh page-faults through all of it again: 4096-h at 4096
tokens took 1.5x as long (docs/performance.md). `moe_impl.runtime.tune_allocator` avoids that for a
whole process, but a library's speed must not depend on its caller's allocator settings.

How: the bank keeps one buffer per gradient and writes the next step's gradient into it, handing
autograd a view. It reuses a buffer only when nothing outside holds its memory any more (the
storage's reference count is back to the buffer's own): once the optimizer has stepped and the
gradients are set to None, as every training loop does between steps. While `param.grad` (or any
view or copy of the same memory a user kept) is alive, for instance when gradients accumulate over
micro-batches, the next gradient goes into a fresh buffer, so no gradient is ever overwritten. Where
torch offers no storage reference count, nothing is reused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_use_count = getattr(torch._C, "_storage_Use_Count", None)
# A buffer is 1 + 1/HEADROOM times its first request, so that sparse gradients, whose size follows
# the active experts from step to step, keep fitting.
HEADROOM = 8


class GradBuffers:
    """Per-name buffers for gradients; `take` returns an uninitialised tensor of a shape."""

    def __init__(self) -> None:
        self._bufs: dict[str, tuple[Tensor, object, int]] = {}  # name -> (buffer, storage, refs)

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of `shape` with like's dtype and device, in name's buffer when it is free."""
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
        return {"_bufs": {}}

    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()
