"""The experts' two matmuls over dispatch blocks, with a hand-written backward.

    h = relu(x · w_in[e]),  y = h · w_out[e]      for the rows x of each block, e its expert

Why not plain autograd: (1) torch.bmm's backward multiplies by transposed (non-contiguous) operands,
which runs ~3x slower on CPU than the same product on a contiguous copy of the small activation;
(2) expert weight gradients are returned directly in the layout the layer asked for: dense, or a
sparse COO tensor over the experts that received tokens (never a dense gradient converted after the
fact, which at 4096+ experts costs more than the matmuls). Computation happens in the input's dtype
(bf16 under autocast); weight gradients come back in the weights' dtype.

Shape suffixes: L = blocks, C = rows per block, D = d_model, H = d_hidden, E = experts, A = active
experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_impl.layer.dispatch import add_rows, select_rows
from moe_impl.layer.workspace import Workspace, bmm, empty


def _t(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when autocast is enabled on x's device type
    (the matmuls then run in it explicitly, with autocast off), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _BlockExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_LCD, w_in_EDH, w_out_EHD, block_expert_L, counts_E, sparse_grad, buffers, copies
    ):
        device = x_LCD.device.type
        dtype = compute_dtype(x_LCD)
        # the weights in the compute dtype where the bank keeps them (compute_copy.py): the
        # casts below are then no-ops, and a gathered block copies half the bytes
        w_in_c, w_out_c = (w_in_EDH, w_out_EHD) if copies is None else copies
        if block_expert_L is None:  # in place: block l is expert l
            w_in_LDH, w_out_LHD = w_in_c, w_out_c
        else:
            w_in_LDH = select_rows(w_in_c, block_expert_L, buffers)
            w_out_LHD = select_rows(w_out_c, block_expert_L, buffers)
        with torch.autocast(device, enabled=False):
            x_LCD_c = x_LCD.to(dtype)
            w_in_LDH, w_out_LHD = w_in_LDH.to(dtype), w_out_LHD.to(dtype)
            h_LCH = bmm(buffers, x_LCD_c, w_in_LDH).relu_()
            y_LCD = bmm(buffers, h_LCH, w_out_LHD)
        ctx.save_for_backward(x_LCD_c, h_LCH, w_in_LDH, w_out_LHD, block_expert_L, counts_E)
        ctx.sparse_grad = sparse_grad
        ctx.buffers = buffers
        ctx.w_shapes = (w_in_EDH.shape, w_out_EHD.shape)
        ctx.w_dtype = w_in_EDH.dtype
        ctx.x_dtype = x_LCD.dtype
        return y_LCD

    @staticmethod
    def backward(ctx, gy_LCD):
        x_LCD, h_LCH, w_in_LDH, w_out_LHD, block_expert_L, counts_E = ctx.saved_tensors
        gy_LCD = gy_LCD.to(h_LCH.dtype).contiguous()
        ws = ctx.buffers
        gh_LCH = relu_backward_(bmm(ws, gy_LCD, w_out_LHD.transpose(1, 2)), h_LCH)
        gx_LCD = None
        if ctx.needs_input_grad[0]:
            gx_LCD = bmm(ws, gh_LCH, w_in_LDH.transpose(1, 2)).to(ctx.x_dtype)
        gw_in = gw_out = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw_in, gw_out = _weight_grads(
                ctx, x_LCD, h_LCH, gh_LCH, gy_LCD, block_expert_L, counts_E
            )
        return gx_LCD, gw_in, gw_out, None, None, None, None, None


def relu_backward_(grad: Tensor, h: Tensor) -> Tensor:
    """relu', in place: grad where h = relu(·) > 0, else 0 (no new tensor of grad's size)."""
    torch.ops.aten.threshold_backward.grad_input(grad, h, 0.0, grad_input=grad)
    return grad


def _weight_grads(ctx, x_LCD, h_LCH, gh_LCH, gy_LCD, block_expert_L, counts_E):
    shape_in, shape_out = ctx.w_shapes
    if block_expert_L is None and ctx.sparse_grad:
        # in place, sparse: only the experts that received tokens (the others' rows are padding)
        active_A = counts_E.nonzero().squeeze(1)
        if active_A.numel() < x_LCD.shape[0]:
            x_LCD, h_LCH, gh_LCH, gy_LCD = (  # the active experts' rows, into the workspace
                select_rows(t, active_A, ctx.buffers) for t in (x_LCD, h_LCH, gh_LCH, gy_LCD)
            )
        block_expert_L = active_A
    g_in = bmm(ctx.buffers, _t(x_LCD), gh_LCH).to(ctx.w_dtype)
    g_out = bmm(ctx.buffers, _t(h_LCH), gy_LCD).to(ctx.w_dtype)
    return layout_weight_grads(
        block_expert_L, g_in, g_out, shape_in, shape_out, ctx.sparse_grad, ctx.buffers
    )


def layout_weight_grads(
    rows_L: Tensor | None,
    g_in_LDH: Tensor,
    g_out_LHD: Tensor,
    shape_in: torch.Size,
    shape_out: torch.Size,
    sparse_grad: bool,
    buffers: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-block weight gradients in the layout the layer asked for. `rows_L` is the (sorted)
    expert of each block, None when block l is expert l of all E (returned as they are, dense);
    else a dense (E, ...) tensor with the blocks added at their rows, or a coalesced sparse COO
    tensor over the blocks' experts (sparse_dim 1) when `sparse_grad`. A dense one is written into
    `buffers` (the bank's Workspace) where given."""
    if rows_L is None:  # in place, dense
        return g_in_LDH, g_out_LHD
    if sparse_grad:
        return _sparse_rows(rows_L, g_in_LDH, shape_in), _sparse_rows(rows_L, g_out_LHD, shape_out)
    return (
        add_rows(shape_in, rows_L, g_in_LDH, out=empty(buffers, shape_in, g_in_LDH)),
        add_rows(shape_out, rows_L, g_out_LHD, out=empty(buffers, shape_out, g_out_LHD)),
    )


def _sparse_rows(rows_L: Tensor, values_L: Tensor, shape: torch.Size) -> Tensor:
    """A coalesced sparse COO gradient from per-block values; `rows_L` is sorted (dispatch sorts
    blocks by expert), so the blocks of one expert are adjacent and summed here, through a 2-D view
    (Tensor.coalesce on these 3-D values costs ~80 ms at 4096 blocks)."""
    unique_U, inverse_L = torch.unique_consecutive(rows_L, return_inverse=True)
    if unique_U.numel() < rows_L.numel():
        values_L = add_rows((unique_U.numel(), *values_L.shape[1:]), inverse_L, values_L)
    return torch.sparse_coo_tensor(
        unique_U[None], values_L, shape, is_coalesced=True, check_invariants=False
    )


def block_expert_mlp(
    x_LCD: Tensor,
    w_in_EDH: Tensor,
    w_out_EHD: Tensor,
    block_expert_L: Tensor | None,
    counts_E: Tensor,
    *,
    sparse_grad: bool,
    buffers: Workspace | None = None,
    copies: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """relu(x · w_in) · w_out per block; `block_expert_L=None` means block l is expert l (in place).
    `counts_E` (slots per expert) tells which experts received tokens, for in-place sparse grads.
    `buffers` (the bank's Workspace) holds the memory of activations and weight gradients.
    `copies`: (w_in, w_out) already in the compute dtype (compute_copy.py), used in their place
    (not differentiated: the weight gradients go to w_in_EDH and w_out_EHD, in their dtype)."""
    return _BlockExpertMLP.apply(
        x_LCD, w_in_EDH, w_out_EHD, block_expert_L, counts_E, sparse_grad, buffers, copies
    )
