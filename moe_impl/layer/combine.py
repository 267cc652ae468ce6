"""The combine of paper Eq. 1 straight from the experts' buffer rows, for the blocked layouts:

    y_b = Σ_j G(x_b)_j · E_j(x_b),   E_j(x_b) = values[row of slot b·k+j]

The same values, bit for bit, as dispatch.from_rows followed by experts._Combine (the rows
gathered into slot order, scaled, summed over k), with one tensor of slots x d_model fewer in the
backward: the gradient of row r is g_token(r) · gate_slot(r), gathered from the tokens' gradient
(tokens x d_model, small) and scaled in place, where the two-step path first wrote every slot's
gradient (slots x d_model) and then gathered that into the rows. Both multiply the same two
numbers, so the results are equal; padding rows get +0, as from_rows' backward gives them.

Shape suffixes: B = tokens, K = k, N = B·K slots, D = d_model, R = buffer rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_impl.layer.dispatch import DispatchPlan, _take_rows
from moe_impl.layer.workspace import Workspace, empty


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_RD, gate_BK, plan, workspace):
        num_tokens, k = gate_BK.shape
        dropped = plan.num_dropped > 0
        y_ND = _take_rows(values_RD, plan.row_of_slot_N, dropped, workspace)
        y_BKD = y_ND.view(num_tokens, k, values_RD.shape[-1])
        gate_BK1 = gate_BK.to(values_RD.dtype)[:, :, None]
        ctx.save_for_backward(y_BKD, gate_BK1, plan.token_of_row_R, plan.slot_of_row_R)
        ctx.workspace, ctx.gate_dtype = workspace, gate_BK.dtype
        # padding rows exist (dispatch.from_rows' test): their gradient is set to +0
        ctx.padded = values_RD.shape[0] > plan.row_of_slot_N.numel() - plan.num_dropped
        prod = torch.mul(y_BKD, gate_BK1, out=empty(workspace, y_BKD.shape, y_BKD))
        return torch.sum(prod, 1, out=empty(workspace, (num_tokens, y_BKD.shape[2]), y_BKD))

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        y_BKD, gate_BK1, token_of_row_R, slot_of_row_R = ctx.saved_tensors
        ws = ctx.workspace
        g_BD = g_BD.to(y_BKD.dtype)
        g_values = g_gate = None
        if ctx.needs_input_grad[0]:
            g_values = _row_gradient(
                g_BD, gate_BK1.view(-1), token_of_row_R, slot_of_row_R, ctx.padded, ws
            )
        if ctx.needs_input_grad[1]:
            prod = empty(ws, y_BKD.shape, y_BKD)
            g_gate = torch.mul(g_BD[:, None, :], y_BKD, out=prod).sum(-1).to(ctx.gate_dtype)
        return g_values, g_gate, None, None


def _row_gradient(
    g_BD: Tensor,
    gate_N: Tensor,
    token_of_row_R: Tensor,
    slot_of_row_R: Tensor,
    padded: bool,
    workspace: Workspace | None,
) -> Tensor:
    """Row r's gradient g_BD[token of r] · gate_N[slot of r] (in g's dtype), +0 for padding rows
    (slot N), which exist where `padded`."""
    num_slots = gate_N.numel()
    g_RD = empty(workspace, (token_of_row_R.numel(), g_BD.shape[1]), g_BD)
    torch.index_select(g_BD, 0, token_of_row_R, out=g_RD)
    if not padded:
        return g_RD.mul_(gate_N.index_select(0, slot_of_row_R)[:, None])
    gate_R = gate_N.index_select(0, slot_of_row_R.clamp(max=num_slots - 1))
    g_RD.mul_(gate_R[:, None])
    padding_R = (slot_of_row_R == num_slots).nonzero().squeeze(1)
    g_RD.index_fill_(0, padding_R, 0)  # +0, where g · gate could give -0
    return g_RD


def combine_rows(
    values_RD: Tensor, gate_BK: Tensor, plan: DispatchPlan, workspace: Workspace | None = None
) -> Tensor:
    """Σ_j gate_bj · values_RD[row of slot b·k+j] (a zero row for a dropped slot), (B, D) in
    values' dtype, for a blocked plan; `workspace` holds the large tensors."""
    return _CombineRows.apply(values_RD, gate_BK, plan, workspace)
