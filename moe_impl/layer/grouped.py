"""The experts as grouped GEMMs (`torch._grouped_mm`), and the choice between them and the blocks.

    h = relu(x · w_in[e]),  y = h · w_out[e]      for the rows x of each expert e

The blocked path (dispatch.py's padded blocks, expert_mlp.py's batched matmuls) runs anywhere. On a
GPU with grouped-GEMM kernels (Hopper and later, bf16) one grouped matmul over an unpadded run of
rows sorted by expert (`make_plan(..., grouped=True)`) does the same work without padding rows or a
block cost model. `choose_kernel` picks the path per forward pass; `expert_kernel(name)` forces it:

    with expert_kernel("grouped"):   # or "blocked"; "auto" restores the automatic choice
        out = layer(x)

A flat layer whose every token goes to every expert (k = E) has a third path, "wide" (wide.py: one
FFN of width E·H, no dispatch); flat.wide_path says when it runs.

Like expert_mlp.py, the backward is written by hand: the expert weight gradients come back dense or
as sparse COO tensors over the active experts (never a dense (E, D, H) temporary for 131072
experts), and plain autograd through `_grouped_mm` is not available on CPU.

No host synchronisation with dense weight gradients: all E experts are groups (offsets = cumsum of
the kept counts, on the device; an idle expert is an empty group, its weight gradient masked to 0),
so nothing is read back per step, as CUDA graphs and `torch.compile(fullgraph=True)` need
(tests/test_grouped_sync_free.py; docs/performance.md says what has run where). This replaced,
rather than sits beside, the earlier gathering of
the active experts' weights (a `nonzero` read back in every forward, a `tolist` of the offsets
beyond MAX_GROUPS groups): one path is simpler, an empty group has no rows to multiply, and the
dense gradient comes out in place instead of being scattered into a zeroed (E, D, H) buffer. Beyond
MAX_GROUPS groups the calls rotate the rows on the device (`_rotated_rows`) instead of slicing them
at host offsets, one gather of the rows per call more. Sparse weight gradients (sparse_grad, by
default from 4096 experts) keep the gathering and the host offsets: their row count is the number
of active experts, which the host must know, and the idle experts' weights are never copied.
What else in a layer reads back is in docs/performance.md ("Host synchronisation").

Shape suffixes: R = rows (kept slots), D = d_model, H = d_hidden, E = experts, G = groups (the
experts the grouped matmuls run over: all E, or only the A active ones), K, N = a product's inner
and output widths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from moe_impl.layer.dispatch import select_rows
from moe_impl.layer.expert_mlp import compute_dtype, layout_weight_grads

__all__ = [
    "KERNELS",
    "choose_kernel",
    "compute_dtype",
    "current_kernel",
    "expert_kernel",
    "grouped_expert_mlp",
    "grouped_mm_available",
]

KERNELS = ("auto", "blocked", "grouped", "wide")
# `torch._grouped_mm`'s fast kernels need compute capability 9.0 (Hopper) or later.
MIN_CAPABILITY = (9, 0)
# Every stride of its operands must be a multiple of 16 bytes: 8 bf16 elements.
ALIGN_BYTES = 16
# At most this many groups per call: CUDA's kernel refuses more ("Can't process more than 1024
# groups", torch 2.11 on an H200, docs/gpu.md); more experts run as several calls.
MAX_GROUPS = 512
# The dtypes `torch._grouped_mm` multiplies on CPU (its meta kernel, which torch.compile traces
# with, may accept fewer: the auto choice uses the grouped kernel only in bf16).
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernel = "auto"


def _check_name(name: str) -> None:
    if name not in KERNELS:
        raise ValueError(f"expert kernel must be one of {', '.join(KERNELS)}; got {name!r}")


@contextmanager
def expert_kernel(name: str) -> Iterator[None]:
    """Force the experts' kernel ("blocked", "grouped", or "wide" for flat layers with k = E,
    flat.wide_path; "auto" = the automatic choice) for the code inside; nestable, the previous choice is restored on exit. Module-level state: it holds
    for every layer and thread while inside."""
    global _kernel
    _check_name(name)
    previous, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = previous


def current_kernel() -> str:
    """The kernel forced now ("auto" when none is)."""
    return _kernel


def grouped_mm_available() -> bool:
    """Whether this torch has `torch._grouped_mm`."""
    return hasattr(torch, "_grouped_mm")


def _aligned(size: int, dtype: torch.dtype) -> bool:
    return size * dtype.itemsize % ALIGN_BYTES == 0


def choose_kernel(
    device: torch.device,
    dtype: torch.dtype,
    d_model: int,
    d_hidden: int,
    num_experts: int | None = None,
) -> str:
    """ "grouped" or "blocked" for `num_experts` experts d_model -> d_hidden -> d_model computing in
    `dtype` on `device`. A kernel forced by `expert_kernel` wins ("wide" raises ValueError here:
    a layer that asks for a plan runs blocked or grouped); "auto" picks "grouped" only
    where torch has `_grouped_mm`, on CUDA with compute capability >= 9.0, in bfloat16, with
    d_model and d_hidden multiples of 8 (16-byte strides) and at most MAX_GROUPS experts (one call:
    on an H200 the blocks were faster from 1024 experts on, where the grouped path needs several
    calls and concatenates their outputs; docs/gpu.md); everywhere else (CPU included, where
    `_grouped_mm` is far slower than the blocks: docs/performance.md) "blocked"."""
    device = torch.device(device)
    if _kernel == "wide":
        raise ValueError(
            "expert_kernel('wide') runs only flat layers with k = num_experts, no capacity limit "
            "and dense expert gradients; this layer runs blocked or grouped: use 'auto'"
        )
    if _kernel == "blocked":
        return "blocked"
    if _kernel == "grouped":
        if not grouped_mm_available():
            raise ValueError(
                f"expert_kernel('grouped') needs torch._grouped_mm, which torch {torch.__version__} "
                "does not have; use 'blocked' or 'auto'"
            )
        if dtype not in GROUPED_DTYPES:
            raise ValueError(
                f"expert_kernel('grouped') computes in {', '.join(map(str, GROUPED_DTYPES))} "
                f"(torch._grouped_mm's dtypes); got {dtype}: use 'blocked' or 'auto'"
            )
        if not (_aligned(d_model, dtype) and _aligned(d_hidden, dtype)):
            raise ValueError(
                f"expert_kernel('grouped') needs d_model and d_hidden whose rows are multiples of "
                f"{ALIGN_BYTES} bytes in {dtype}; got d_model={d_model}, d_hidden={d_hidden}"
            )
        return "grouped"
    if (
        grouped_mm_available()
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and d_model % 8 == 0
        and d_hidden % 8 == 0
        and (num_experts is None or num_experts <= MAX_GROUPS)
        and tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY
    ):
        return "grouped"
    return "blocked"


def _ready(t: Tensor) -> Tensor:
    """t contiguous and starting on a 16-byte boundary, as `_grouped_mm` requires. NOTE: under
    torch.compile the pointer cannot be read without a graph break; there only contiguity is
    ensured (the operands are then fresh allocations or parameters, which the allocators align)."""
    t = t.contiguous()
    if not torch.compiler.is_compiling() and t.data_ptr() % ALIGN_BYTES:
        t = t.clone()
    return t


def _grouped_mm(a: Tensor, b: Tensor, offs_G: Tensor, ends: list[int] | None) -> Tensor:
    """`torch._grouped_mm(a, b, offs=offs_G)` in calls of at most MAX_GROUPS groups.

    2-D x 3-D (a: rows x K, b: G x K x N) gives rows x N; 2-D x 2-D (a: K x rows, b: rows x N,
    the groups splitting the rows) gives G x K x N. Beyond MAX_GROUPS groups, `ends` (offs_G on
    the host) slices each call's rows; without it (None) the calls rotate the rows on the device
    instead (`_rotated_rows`, `_rotated_reduction`)."""
    if offs_G.numel() <= MAX_GROUPS:
        return torch._grouped_mm(a, b, offs=offs_G)
    if ends is None:
        return _rotated_rows(a, b, offs_G) if b.dim() == 3 else _rotated_reduction(a, b, offs_G)
    parts = []
    for g0 in range(0, len(ends), MAX_GROUPS):
        g1 = min(g0 + MAX_GROUPS, len(ends))
        start, end = (ends[g0 - 1] if g0 else 0), ends[g1 - 1]
        offs = offs_G[g0:g1] - start
        if b.dim() == 3:  # rows start:end against the weights of groups g0:g1
            parts.append(torch._grouped_mm(a[start:end], b[g0:g1], offs=offs))
        else:  # the reduction over rows start:end, one product per group
            parts.append(torch._grouped_mm(a[:, start:end], b[start:end], offs=offs))
    return torch.cat(parts)


def _chunks(offs_G: Tensor, num_rows: int) -> Iterator[tuple[int, int, Tensor, Tensor | None]]:
    """(g0, g1, start, rotation_R) for each call of groups g0:g1 (at most MAX_GROUPS): `start`,
    a 0-d device tensor, is the first row of group g0; rotation_R = (r + start) mod rows brings it
    to row 0 (None for the first call, whose rows already start there)."""
    row_R = torch.arange(num_rows, device=offs_G.device)
    for g0 in range(0, offs_G.numel(), MAX_GROUPS):
        g1 = min(g0 + MAX_GROUPS, offs_G.numel())
        if g0 == 0:
            yield g0, g1, offs_G.new_zeros(()), None
        else:
            start = offs_G[g0 - 1]
            yield g0, g1, start, (row_R + start) % num_rows


# NOTE: a call's groups always start at row 0 and its rows past the last offset are left
# unwritten, so without host offsets each call gets all the rows, rotated on the device to put
# its groups first: no row range is read back, at the price of a gather of the rows per call.


def _rotated_rows(a_RK: Tensor, b_GKN: Tensor, offs_G: Tensor) -> Tensor:
    """The 2-D x 3-D product of `_grouped_mm` without host offsets: each call multiplies the rows
    rotated to start at its first group, and its rows (start <= r < its last offset) are taken
    back into place with a mask, so that the unwritten rows of each call are never read."""
    num_rows = a_RK.shape[0]
    row_R = torch.arange(num_rows, device=a_RK.device)
    y_RN: Tensor | None = None
    for g0, g1, start, rotation_R in _chunks(offs_G, num_rows):
        a = a_RK if rotation_R is None else a_RK.index_select(0, rotation_R)
        part_RN = torch._grouped_mm(a, b_GKN[g0:g1], offs=offs_G[g0:g1] - start)
        if rotation_R is not None:  # back: row r was rotated row (r - start) mod rows
            part_RN = part_RN.index_select(0, (row_R - start) % num_rows)
        mine_R1 = ((row_R >= start) & (row_R < offs_G[g1 - 1]))[:, None]
        y_RN = torch.where(mine_R1, part_RN, 0 if y_RN is None else y_RN)
    assert y_RN is not None  # more than MAX_GROUPS groups: at least two calls
    return y_RN


def _rotated_reduction(a_KR: Tensor, b_RN: Tensor, offs_G: Tensor) -> Tensor:
    """The 2-D x 2-D product of `_grouped_mm` without host offsets: each call reduces over the
    rows rotated to start at its first group (the rows past its last offset do not enter)."""
    parts = []
    for g0, g1, start, rotation_R in _chunks(offs_G, b_RN.shape[0]):
        a, b = a_KR, b_RN
        if rotation_R is not None:  # a keeps its layout: a K x rows view of a rows x K tensor
            a, b = a_KR.t().index_select(0, rotation_R).t(), b_RN.index_select(0, rotation_R)
        parts.append(torch._grouped_mm(a, b, offs=offs_G[g0:g1] - start))
    return torch.cat(parts)


def _host_ends(offs_G: Tensor) -> list[int] | None:
    return offs_G.tolist() if offs_G.numel() > MAX_GROUPS else None


def _active_groups(
    counts_E: Tensor, w_in_EDH: Tensor, w_out_EHD: Tensor
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """(rows_G, sizes_G, w_in_GDH, w_out_GHD) of the groups the sparse-gradient path runs: only
    the A active experts, their weights gathered (rows_G = their ids), or all E in place when
    every one is active (rows_G None). `nonzero` reads the active count back to the host."""
    active_A = counts_E.nonzero().squeeze(1)
    if active_A.numel() == counts_E.numel():
        return None, counts_E, w_in_EDH, w_out_EHD
    w_in_GDH, w_out_GHD = select_rows(w_in_EDH, active_A), select_rows(w_out_EHD, active_A)
    return active_A, counts_E.index_select(0, active_A), w_in_GDH, w_out_GHD


class _GroupedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_in_EDH, w_out_EHD, counts_E, sparse_grad, copies):
        device = x_RD.device.type
        dtype = compute_dtype(x_RD)
        # the weights in the compute dtype where the bank keeps them (compute_copy.py)
        w_in_c, w_out_c = (w_in_EDH, w_out_EHD) if copies is None else copies
        if sparse_grad:  # the active experts only (a host read), and host offsets beyond MAX_GROUPS
            rows_G, sizes_G, w_in_GDH, w_out_GHD = _active_groups(counts_E, w_in_c, w_out_c)
        else:  # all E experts as groups, the idle ones empty: nothing read back to the host
            rows_G, sizes_G, w_in_GDH, w_out_GHD = None, counts_E, w_in_c, w_out_c
        offs_G = torch.cumsum(sizes_G, 0, dtype=torch.int32)
        ends = _host_ends(offs_G) if sparse_grad else None
        with torch.autocast(device, enabled=False):
            x_RD_c = _ready(x_RD.to(dtype))
            w_in_GDH, w_out_GHD = _ready(w_in_GDH.to(dtype)), _ready(w_out_GHD.to(dtype))
            if x_RD.shape[0] == 0:
                h_RH = x_RD_c.new_zeros(0, w_in_GDH.shape[-1])
                y_RD = x_RD_c.new_zeros(0, w_out_GHD.shape[-1])
            else:
                h_RH = _grouped_mm(x_RD_c, w_in_GDH, offs_G, ends).relu_()
                y_RD = _grouped_mm(h_RH, w_out_GHD, offs_G, ends)
        ctx.save_for_backward(x_RD_c, h_RH, w_in_GDH, w_out_GHD, offs_G, sizes_G, rows_G)
        ctx.ends = ends
        ctx.sparse_grad = sparse_grad
        ctx.w_shapes = (w_in_EDH.shape, w_out_EHD.shape)
        ctx.w_dtype = w_in_EDH.dtype
        ctx.x_dtype = x_RD.dtype
        return y_RD

    @staticmethod
    def backward(ctx, gy_RD):
        x_RD, h_RH, w_in_GDH, w_out_GHD, offs_G, sizes_G, rows_G = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gx_RD = gw_in = gw_out = None
        with torch.autocast(x_RD.device.type, enabled=False):
            if x_RD.shape[0] == 0:  # no rows: nothing for _grouped_mm to do
                gx_RD = x_RD.new_zeros(x_RD.shape, dtype=ctx.x_dtype) if need_x else None
                g_in, g_out = (
                    w_in_GDH.new_zeros(w_in_GDH.shape),
                    w_out_GHD.new_zeros(w_out_GHD.shape),
                )
            else:
                ends = ctx.ends
                gy_RD = _ready(gy_RD.to(h_RH.dtype))
                gh_RH = torch.ops.aten.threshold_backward(
                    _grouped_mm(gy_RD, w_out_GHD.transpose(1, 2), offs_G, ends), h_RH, 0.0
                )  # relu': zero where h = relu(·) is 0
                if need_x:
                    gx_RD = _grouped_mm(gh_RH, w_in_GDH.transpose(1, 2), offs_G, ends)
                    gx_RD = gx_RD.to(ctx.x_dtype)
                if need_w:  # 2-D x 2-D: offs split the row (reduction) dim, a product per group
                    g_in = _grouped_mm(x_RD.t(), gh_RH, offs_G, ends)
                    g_out = _grouped_mm(h_RH.t(), gy_RD, offs_G, ends)
                    if not ctx.sparse_grad:  # all E groups: the idle experts' are empty
                        g_in, g_out = _zero_empty_(g_in, sizes_G), _zero_empty_(g_out, sizes_G)
        if need_w:
            gw_in, gw_out = _weight_grads(ctx, rows_G, g_in, g_out)
        return gx_RD, gw_in, gw_out, None, None, None


def _zero_empty_(g_GKN: Tensor, sizes_G: Tensor) -> Tensor:
    """g with the groups of no rows set to 0, in place: what `_grouped_mm` writes for an empty
    group's product is not documented (on CPU it writes 0). A mask on the device, no host read."""
    return g_GKN.masked_fill_((sizes_G == 0)[:, None, None], 0)


def _weight_grads(ctx, rows_G: Tensor | None, g_in_GDH: Tensor, g_out_GHD: Tensor):
    """The groups' weight gradients in the layout the layer asked for (expert_mlp's)."""
    if rows_G is None and ctx.sparse_grad:  # in place: every one of the E experts active
        rows_G = torch.arange(g_in_GDH.shape[0], device=g_in_GDH.device)
    shape_in, shape_out = ctx.w_shapes
    return layout_weight_grads(
        rows_G,
        g_in_GDH.to(ctx.w_dtype),
        g_out_GHD.to(ctx.w_dtype),
        shape_in,
        shape_out,
        ctx.sparse_grad,
    )


def grouped_expert_mlp(
    x_RD: Tensor,
    w_in_EDH: Tensor,
    w_out_EHD: Tensor,
    counts_E: Tensor,
    *,
    sparse_grad: bool,
    copies: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """relu(x · w_in[e]) · w_out[e] for rows x_RD sorted by expert, expert e owning the next
    counts_E[e] rows (no padding; sum(counts_E) = R). Computes in `compute_dtype(x_RD)` (bf16 under
    autocast) and returns y in it; the input gradient comes back in x's dtype, the weight gradients
    in the weights' dtype: dense (E, ...), or coalesced sparse COO tensors over the experts with
    rows (sparse_dim 1, indices sorted) when `sparse_grad`, as `expert_mlp.block_expert_mlp`.

    Without `sparse_grad` nothing is read back to the host (module docstring), so it traces
    under `torch.compile(fullgraph=True)`. With it, the active experts are found with one host
    read per forward (`nonzero`: the sparse gradient's row count depends on the data).
    `copies`: (w_in, w_out) already in the compute dtype, used in their place (block_expert_mlp's)."""
    return _GroupedExpertMLP.apply(x_RD, w_in_EDH, w_out_EHD, counts_E, sparse_grad, copies)
