"""The flat layer when every token goes to every expert (k = E, dropless): one wide FFN.

With k = E (the paper's MoE-4 uses all 4 of its experts, App. C) the top-k selects every expert
and paper Eq. 1 sums over all of them:

    y = Σ_e G(x)_e · relu(x · w_in[e]) · w_out[e] = (g ⊙ relu(x · W_in)) · W_out

with W_in = [w_in[0] | ... | w_in[E-1]] (D, E·H), W_out the experts' w_out stacked (E·H, D) and g
each expert's gate repeated over its H hidden units. That is a dense FFN of width E·H whose hidden
units are scaled by their expert's gate: two matmuls over the tokens as they are, instead of
dispatching B·E slots into blocks, E batched products and a combine. Same function, same FLOPs;
the sums run in another order, so results agree with the blocked path to rounding, not bit for
bit (tests/test_wide.py).

The backward is written by hand, in the workspace's memory like the blocked path (expert_mlp.py):

    ∂y/∂W_out = (g ⊙ h)ᵀ · gy,   s = gy · W_outᵀ,   ∂y/∂g_e = Σ_{j in e} s_j h_j,
    a = relu'(h) ⊙ g ⊙ s,   ∂y/∂W_in = xᵀ · a,   ∂y/∂x = a · W_inᵀ

Computation runs in the compute dtype (autocast's, else x's); the weight gradients come back in
the weights' dtype, the gates' gradient in the gates' dtype.

Shape suffixes: B = tokens, D = d_model, H = d_hidden, E = experts, F = E·H (the wide hidden layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_impl.layer.expert_mlp import compute_dtype, relu_backward_
from moe_impl.layer.workspace import Workspace, empty, mm


def _contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as a contiguous tensor of `dtype`, in one copy (Tensor.to keeps t's strides, and returns t
    itself when the dtype is already t's)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


class _WideExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, gate_BE, w_in_EDH, w_out_EHD, workspace, copies):
        num_experts, d_model, d_hidden = w_in_EDH.shape
        dtype = compute_dtype(x_BD)
        w_in_c, w_out_c = (w_in_EDH, w_out_EHD) if copies is None else copies
        with torch.autocast(x_BD.device.type, enabled=False):
            x_c = x_BD.to(dtype)
            # (E, D, H) -> (D, E·H): column e·H + j is expert e's hidden unit j
            w_in_DF = w_in_c.to(dtype).permute(1, 0, 2).reshape(d_model, -1)
            w_out_FD = w_out_c.to(dtype).reshape(-1, d_model)
            gate_BE1 = gate_BE.to(dtype)[:, :, None]
            h_BF = mm(workspace, x_c, w_in_DF).relu_()
            scaled_BF = empty(workspace, h_BF.shape, h_BF)
            torch.mul(
                h_BF.view(-1, num_experts, d_hidden),
                gate_BE1,
                out=scaled_BF.view(-1, num_experts, d_hidden),
            )
            y_BD = mm(workspace, scaled_BF, w_out_FD)
        ctx.save_for_backward(x_c, gate_BE1, h_BF, scaled_BF, w_in_DF, w_out_FD)
        ctx.workspace = workspace
        ctx.dtypes = (x_BD.dtype, gate_BE.dtype, w_in_EDH.dtype)
        ctx.w_shape = (num_experts, d_model, d_hidden)
        return y_BD.to(x_BD.dtype)

    @staticmethod
    def backward(ctx, gy_BD):
        x_c, gate_BE1, h_BF, scaled_BF, w_in_DF, w_out_FD = ctx.saved_tensors
        ws = ctx.workspace
        x_dtype, gate_dtype, w_dtype = ctx.dtypes
        num_experts, d_model, d_hidden = ctx.w_shape
        gy_BD = gy_BD.to(h_BF.dtype).contiguous()
        g_scaled_BF = mm(ws, gy_BD, w_out_FD.t())
        g_gate = None
        if ctx.needs_input_grad[1]:  # Σ_j s_j h_j per (token, expert): a batch of dot products
            rows = h_BF.numel() // d_hidden
            dots = torch.bmm(g_scaled_BF.view(rows, 1, d_hidden), h_BF.view(rows, d_hidden, 1))
            g_gate = dots.view(-1, num_experts).to(gate_dtype)
        g_h_BEH = g_scaled_BF.view(-1, num_experts, d_hidden).mul_(gate_BE1)
        g_pre_BF = relu_backward_(g_h_BEH.view_as(h_BF), h_BF)
        g_x = mm(ws, g_pre_BF, w_in_DF.t()).to(x_dtype) if ctx.needs_input_grad[0] else None
        g_in = g_out = None
        if ctx.needs_input_grad[2]:
            g_in_DF = mm(ws, x_c.t(), g_pre_BF)
            g_in = _contiguous(
                g_in_DF.view(d_model, num_experts, d_hidden).permute(1, 0, 2), w_dtype
            )
        if ctx.needs_input_grad[3]:  # as (gyᵀ · (g ⊙ h))ᵀ, the orientation MKL runs faster
            g_out_DF = mm(ws, gy_BD.t(), scaled_BF)
            g_out = _contiguous(g_out_DF.t().reshape(num_experts, d_hidden, d_model), w_dtype)
        return g_x, g_gate, g_in, g_out, None, None


def wide_expert_mlp(
    x_BD: Tensor,
    gate_BE: Tensor,
    w_in_EDH: Tensor,
    w_out_EHD: Tensor,
    *,
    workspace: Workspace | None = None,
    copies: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """y_b = Σ_e gate[b, e] · relu(x_b · w_in[e]) · w_out[e] for every token b and expert e, as one
    wide FFN (module docstring). `gate_BE`: each token's gate of every expert, in expert order.
    `workspace`: the bank's Workspace for the activations' memory; `copies`: (w_in, w_out) already
    in the compute dtype (compute_copy.py), used in their place (gradients go to w_in, w_out)."""
    return _WideExpertMLP.apply(x_BD, gate_BE, w_in_EDH, w_out_EHD, workspace, copies)
