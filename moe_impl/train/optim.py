"""The paper's memory-saving Adam for expert parameters (Shazeer et al. 2017, App. D).

    β1 = 0 (no first moment);  second moment factored per weight matrix W (r x c):
    v_row ← β2·v_row + (1 − β2)·mean_cols(g²),   v_col ← β2·v_col + (1 − β2)·mean_rows(g²)
    v̂ = outer(v_row, v_col) / mean(v_row) / (1 − β2^t),   W ← W − lr · g / (sqrt(v̂) + ε)

"for each weight matrix keep row-wise and column-wise averages of the second-moment matrix and
approximate the full matrix as their outer product divided by the mean of either one" (paper.md
§5). DEVIATION(t2t): tensor2tensor's DietAdam factorises after the square root; we follow the paper.

Made for the expert banks of moe_impl (parameters of shape (E, r, c), one matrix per expert) and
their sparse gradients (`sparse_grad=True`): only the experts present in the gradient are touched,
each with its own step count t, so per-step cost and state scale with the active experts and the
state is O(E·(r + c)) floats instead of Adam's 2·E·r·c. 2-D parameters count as one matrix.
Defaults β2 = 0.98, ε = 1e-10 are tensor2tensor's DietAdam values (the paper gives none).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class FactoredAdam(torch.optim.Optimizer):
    """β1 = 0 Adam with factored second moments; accepts dense and sparse (COO, sparse_dim 1) grads."""

    def __init__(
        self, params: Iterable[Tensor], lr: float = 1e-3, beta2: float = 0.98, eps: float = 1e-10
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, {"lr": lr, "beta2": beta2, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(
                        "FactoredAdam takes weight matrices (r, c) or expert banks (E, r, c); "
                        f"got a parameter of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group["lr"], group["beta2"], group["eps"])
        return loss

    def _update(self, p: Tensor, lr: float, beta2: float, eps: float) -> None:
        bank = p if p.dim() == 3 else p.unsqueeze(0)  # (E, r, c)
        num, rows, cols = bank.shape
        state = self.state[p]
        if not state:
            state["v_row"] = bank.new_zeros(num, rows)
            state["v_col"] = bank.new_zeros(num, cols)
            state["step"] = torch.zeros(num, dtype=torch.long, device=p.device)
        grad = p.grad
        if grad.is_sparse:
            idx = grad._indices()[0]
            # moe_impl's expert gradients hold each active expert once, in order; autograd drops
            # the coalesced flag, and coalescing them again costs ~80 ms at 4096 experts
            if not (grad.is_coalesced() or bool((idx[1:] > idx[:-1]).all())):
                grad = grad.coalesce()
                idx = grad._indices()[0]
            g = grad._values()
        else:
            idx, g = None, grad.view(num, rows, cols)
        take = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        g2 = g * g  # (a multiply: pow(2) is twice as slow on CPU)
        v_row = take(state["v_row"]).mul_(beta2).add_(g2.sum(2), alpha=(1 - beta2) / cols)
        v_col = take(state["v_col"]).mul_(beta2).add_(g2.sum(1), alpha=(1 - beta2) / rows)
        del g2
        step = take(state["step"]) + 1
        correction = 1 - beta2 ** step.to(g.dtype)
        scale = correction * v_row.mean(1).clamp_min(torch.finfo(g.dtype).tiny)
        # sqrt(v̂) = outer(sqrt(v_row / scale), sqrt(v_col)): one (E, r, c) pass builds
        # sqrt(v̂) + ε, a second turns it into the update g / (sqrt(v̂) + ε)
        r = v_row.div(scale[:, None]).sqrt_()
        c = v_col.sqrt()
        update = torch.addcmul(g.new_full((1, 1, 1), eps), r[:, :, None], c[:, None, :])
        torch.div(g, update, out=update)
        if idx is None:
            state["v_row"], state["v_col"], state["step"] = v_row, v_col, step
            bank.sub_(update, alpha=lr)
        else:
            state["v_row"].index_copy_(0, idx, v_row)
            state["v_col"].index_copy_(0, idx, v_col)
            state["step"].index_copy_(0, idx, step)
            flat = bank.view(num, rows * cols)
            flat.index_add_(0, idx, update.view(-1, rows * cols), alpha=-lr)
