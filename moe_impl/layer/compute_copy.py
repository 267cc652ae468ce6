"""Expert weights in the compute dtype, kept from step to step instead of cast in every forward.

Under autocast the experts multiply in its dtype (bf16; expert_mlp.compute_dtype) while their
weights are float32 parameters, so every forward cast all of w_in and w_out (the in-place layout,
the grouped kernel with dense gradients) or gathered float32 rows and cast them (the gathered
layouts). Here an ExpertBank keeps a copy of each weight in the compute dtype, valid while its
parameter is unchanged: the same object, data pointer, dtype, device and in-place version counter
(`Tensor._version`, bumped by every in-place write through the parameter or a view of it:
load_state_dict's copy_, an edit under no_grad, a foreach optimizer's step). A forward with a
valid copy uses it (the gathered layouts gather its rows: half the bytes of float32 rows); else it
casts the whole parameter once and keeps the result (a full cast).

What keeps the copies in step with the parameters:
- an expert optimizer that changed only some experts' rows (FactoredAdam with sparse gradients,
  moe_impl/train/optim.py) calls `rows_updated` right after its update: those rows are recast
  (the whole copy, in place, past FULL_RECAST_SHARE of them) and the copy is valid again, so a
  sparse step recasts the active experts' rows only;
- torch's fused optimizers (`torch.optim.Adam(fused=True)`, as the trainer builds it) write
  without bumping the version counter, so a global optimizer step pre-hook (registered when the
  first copy is made) frees
  the copies of every parameter an optimizer is about to step, except an optimizer's that keeps
  them itself (`keeps_compute_copies = True`: FactoredAdam); freed before the step, a copy takes
  no memory while that optimizer works, as the per-forward cast did not;
- any other in-place change bumps the counter and the next forward recasts everything.

Why a copy beside float32 parameters, not bf16 parameters with float32 master weights in the
optimizer: the copy changes nothing outside the layer and one call in the expert optimizer. The
parameters, their gradients (float32, summed in float32 over micro-batches), the state_dict, the
checkpoints, gradient clipping, the expert-parallel gradient sums and every optimizer (torch's
fused Adam among them) stay as they are, and the layer's outputs and gradients stay bit for bit
those of the per-forward cast, since the copy holds exactly `param.to(dtype)`
(tests/test_compute_copy.py). Master weights would need an optimizer that owns a float32 copy of
every expert weight and writes the bf16 one back: each optimizer (SparseAdam too) rewritten.

Memory: 2 bytes per weight in bf16, for as long as the bank keeps them. The in-place layout held
a cast of all the weights from each forward to its backward already; the gathered layouts held only
their blocks'. Under FactoredAdam the copy also lives through the optimizer's step and between
steps; under any other optimizer it is freed before the step. Copies are made only under autocast, where its dtype differs from the parameters',
and never while torch.compile traces; `ExpertBank.keep_compute_copies = False` turns them off and
frees them.

NOTE: a write through `param.data` bumps no counter the copy can see (nothing in moe_impl writes
so); call `ExpertBank.drop_compute_copies()` after one. In the in-place layout the copy itself is
saved for the backward, so an update between a forward and its backward (which would also have
changed the weights the backward uses) makes autograd raise on the copy's version.

Shape suffixes: E = experts, A = rows (experts) an optimizer changed, W = a row's values.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

# Past this share of changed rows `rows_updated` recasts the whole copy in place (one converting
# copy_) instead of gathering, casting and scattering the rows, which costs 2-3x as much per row on
# our CPU (docs/performance.md, "Expert weights in the compute dtype").
FULL_RECAST_SHARE = 1 / 3
# On CPU the rows go through scratch buffers of this many bytes of the parameter's rows, reused
# chunk after chunk: a fresh buffer for all of them (tens of MB) page-faults through its memory
# again in every step (workspace.py), which made the row recast ~3x slower.
CPU_CHUNK_BYTES = 1 << 20

# The copy of each parameter that has one, by id(parameter); the entry goes with its copy (and
# `copy_of` checks the parameter itself, so a reused id finds nothing).
_copies: weakref.WeakValueDictionary[int, ComputeCopy] = weakref.WeakValueDictionary()


def _state(param: Tensor, dtype: torch.dtype, version: int | None = None) -> tuple:
    """What must be unchanged for a copy of `param` in `dtype` to stay valid."""
    version = param._version if version is None else version
    return (version, param.data_ptr(), param.dtype, param.device, param.shape, dtype)


class ComputeCopy:
    """`param.to(dtype)` of one parameter, recast only where the parameter changed (module
    docstring). `full_casts` and `rows_cast` count the casts of the whole parameter and the rows
    recast by `rows_updated`."""

    def __init__(self) -> None:
        self.tensor: Tensor | None = None
        self._param: weakref.ref[Tensor] | None = None
        self._state: tuple | None = None
        self.full_casts = 0
        self.rows_cast = 0
        # nn.DataParallel's replicas share the bank's attributes: one thread at a time here
        self._lock = threading.Lock()

    def holds(self, param: Tensor) -> bool:
        return self._param is not None and self._param() is param

    def get(self, param: Tensor, dtype: torch.dtype) -> Tensor:
        """The copy of `param` in `dtype`: the kept one while valid, else a fresh full cast."""
        with self._lock:
            state = _state(param, dtype)
            if self.tensor is not None and self._state == state and self.holds(param):
                return self.tensor
            self.tensor = None  # the stale copy's memory goes before the new one is taken
            with torch.no_grad():
                tensor = param.detach().to(dtype, memory_format=torch.contiguous_format)
            self.tensor, self._state, self._param = tensor, state, weakref.ref(param)
            self.full_casts += 1
            _copies[id(param)] = self
            _hook_optimizers()
            return tensor

    def rows_updated(self, param: Tensor, rows_A: Tensor, version_before: int) -> None:
        """After an in-place update of `param` that changed rows `rows_A` only (dim 0) and nothing
        else since its version was `version_before`: recast those rows (all of them, in place,
        past FULL_RECAST_SHARE of the rows) and mark the copy valid. A copy already stale before
        the update stays stale (the next forward recasts it all)."""
        with self._lock:
            if self.tensor is None or not self.holds(param):
                return
            dtype = self.tensor.dtype
            if self._state != _state(param, dtype, version_before):
                return
            num = param.shape[0]
            with torch.no_grad():
                if rows_A.numel() > FULL_RECAST_SHARE * num:
                    self.tensor.copy_(param.detach())
                else:
                    _recast_rows(param.detach().reshape(num, -1), self.tensor.view(num, -1), rows_A)
            self._state = _state(param, dtype)
            self.rows_cast += rows_A.numel()

    def clear(self) -> None:
        """Free the copy (the counters stay): the next `get` recasts the whole parameter."""
        with self._lock:
            self.tensor, self._param, self._state = None, None, None

    # Neither pickled nor copied with the module: a copy is derived state, not state.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]  # a fresh, empty copy (mypy: __init__ on an instance)

    def __deepcopy__(self, memo: dict) -> ComputeCopy:
        return ComputeCopy()


def _recast_rows(src_EW: Tensor, dst_EW: Tensor, rows_A: Tensor) -> None:
    """dst[rows] = src[rows] in dst's dtype: gathered, cast and scattered in chunks of
    CPU_CHUNK_BYTES on CPU (through two reused scratch buffers), in one go elsewhere."""
    num_rows, width = rows_A.numel(), src_EW.shape[1]
    chunk = num_rows
    if src_EW.device.type == "cpu":
        chunk = max(1, min(num_rows, CPU_CHUNK_BYTES // (width * src_EW.element_size())))
    gathered = src_EW.new_empty(chunk, width)
    cast = dst_EW.new_empty(chunk, width)
    for start in range(0, num_rows, chunk):
        rows = rows_A[start : start + chunk]
        n = rows.numel()
        torch.index_select(src_EW, 0, rows, out=gathered[:n])
        dst_EW.index_copy_(0, rows, cast[:n].copy_(gathered[:n]))


def copy_of(param: Tensor) -> ComputeCopy | None:
    """The compute copy an ExpertBank keeps of `param`, if any (for optimizers: `rows_updated`)."""
    copy = _copies.get(id(param))
    return copy if copy is not None and copy.holds(param) else None


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Every optimizer's step pre-hook: the copies of the parameters it is about to step are freed
    (a fused step bumps no version counter), unless the optimizer keeps them (FactoredAdam)."""
    if not _copies or getattr(optimizer, "keeps_compute_copies", False):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            copy = copy_of(param)
            if copy is not None:
                copy.clear()


@functools.cache  # once per process
def _hook_optimizers() -> None:
    """Register `_before_optimizer_step` with torch when the first copy is made (importing
    moe_impl touches no optimizer)."""
    register_optimizer_step_pre_hook(_before_optimizer_step)
