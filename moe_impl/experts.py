"""A bank of feed-forward experts, E_i(x) = relu(x · w_in[i]) · w_out[i] (paper Sec. 2, App. C).

No biases, as in the paper's parameter counts and tensor2tensor's experts (paper.md §1.2). The
weights of all experts live in two stacked parameters so that dispatch can run them as batched
matmuls over blocks (dispatch.py); this module knows nothing about gating.

Initialisation (our choice; t2t uses Glorot-uniform and scales the output layer by sqrt(d/h)):
w_in ~ U(±sqrt(6/d)) (He: variance 2/d, for the ReLU) and w_out ~ U(±sqrt(3/h)) (variance 1/h), so
that each expert maps a unit-variance input to an output of variance about 1 whatever d and h.

Shape suffixes: B = tokens, N = slots, E = experts, D = d_model, H = d_hidden, R = buffer rows,
L = blocks, C = rows per block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_impl.dispatch import DispatchPlan, dispatch, from_rows
from moe_impl.expert_mlp import block_expert_mlp


class ExpertBank(nn.Module):
    """`num_experts` two-layer ReLU experts with weights w_in (E, D, H) and w_out (E, H, D).

    `sparse_grad=True` makes the weight gradients sparse COO tensors over the experts that received
    tokens (sparse_dim 1, like nn.Embedding(sparse=True)): memory then grows with the active experts,
    not with all of them. Optimizers must accept sparse gradients (torch.optim.SparseAdam, Adagrad,
    or moe_impl.optim.FactoredAdam).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, *, sparse_grad: bool) -> None:
        super().__init__()
        self.sparse_grad = sparse_grad
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d_model, d_hidden = self.w_in.shape[1:]
        with torch.no_grad():
            self.w_in.uniform_(-math.sqrt(6.0 / d_model), math.sqrt(6.0 / d_model))
            self.w_out.uniform_(-math.sqrt(3.0 / d_hidden), math.sqrt(3.0 / d_hidden))

    def forward(self, x_BD: Tensor, gate_N: Tensor, plan: DispatchPlan, k: int) -> Tensor:
        """y_b = Σ over the k slots of token b of gate · E_expert(x_b) (paper Eq. 1); the slots of
        token b are b·k ... b·k+k-1."""
        num_tokens, d_model = x_BD.shape
        x_LCD = dispatch(x_BD, plan, k).view(plan.num_blocks, plan.block_size, d_model)
        y_LCD = block_expert_mlp(
            x_LCD,
            self.w_in,
            self.w_out,
            plan.block_expert_L,
            plan.counts_E,
            sparse_grad=self.sparse_grad,
        )
        y_RD = y_LCD.view(-1, d_model)
        y_BKD = from_rows(y_RD, plan).view(num_tokens, k, d_model)
        y_BD = (y_BKD * gate_N.view(num_tokens, k, 1).to(y_BKD.dtype)).sum(1)
        return y_BD.to(x_BD.dtype)
