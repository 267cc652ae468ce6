"""The flat sparsely-gated MoE layer (Shazeer et al. 2017, Sec. 2-4): noisy top-k gate, dropless
dispatch, expert bank, and the importance + load losses.

    y = Σ_i G(x)_i E_i(x),   L_aux = w_importance · CV(Importance(X))² + w_load · CV(Load(X))²

Load is the smooth estimator Σ_x P(x, i) (Eq. 8-10) when the gate is noisy and k < n, else the true
count (tensor2tensor, paper.md §6.4). The layer returns its losses; it keeps no global state.

Shape suffixes: B = tokens (all leading dims flattened), D = d_model, E = experts, K = k, N = B*K slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_impl.layer import balancing
from moe_impl.layer.dispatch import make_plan
from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.gating import NoisyTopKGate

# Above this many experts the expert gradients are sparse by default (ExpertBank docstring).
SPARSE_GRAD_MIN_EXPERTS = 4096


class RoutingStats(NamedTuple):
    """Routing statistics of one forward pass, detached, for logging (no recomputation needed)."""

    tokens_per_expert: Tensor  # (E,) int64 slots routed to each expert (the true load)
    importance: Tensor  # (E,) Importance(X), Eq. 6 (Eq. 13 when hierarchical)
    load: Tensor  # (E,) the load the loss used: smooth estimate (Eq. 10 / 14) or true count
    cv_importance: Tensor  # CV, not squared, as the paper's Table 6
    cv_load: Tensor
    max_over_mean_load: Tensor  # max / mean of tokens_per_expert (Table 6's max(Load)/mean(Load))
    num_dropped: int  # slots dropped by a capacity limit; 0 with the paper's dropless default


class MoEOutput(NamedTuple):
    y: Tensor  # same shape as the input
    aux_loss: Tensor  # importance_loss + load_loss, scalar; add it to the task loss
    importance_loss: Tensor  # w_importance · CV(Importance)²
    load_loss: Tensor  # w_load · CV(Load)²
    stats: RoutingStats


def check_positive_int(**values: int) -> None:
    """ValueError naming the argument unless each value is an int >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_k(k_name: str, k: int, n_name: str, n: int) -> None:
    check_positive_int(**{k_name: k})
    if k > n:
        raise ValueError(f"{k_name}={k} must be <= {n_name}={n}")


def check_options(w_importance: float, w_load: float, capacity_factor: float | None) -> None:
    for name, value in (("w_importance", w_importance), ("w_load", w_load)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")


def flatten_input(x: Tensor, d_model: int) -> Tensor:
    """(..., d_model) -> (B, d_model), with a clear error for a wrong width or dtype."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(
            f"x must have last dimension d_model={d_model}, got shape {tuple(x.shape)}"
        )
    return x.reshape(-1, d_model)


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Slots each expert may keep: ceil(capacity_factor · slots / experts); None when dropless."""
    if capacity_factor is None:
        return None
    return max(1, -(-int(capacity_factor * num_slots) // num_experts))


def routing_stats(
    counts_E: Tensor, importance_E: Tensor, load_E: Tensor, num_dropped: int
) -> RoutingStats:
    with torch.no_grad():
        counts_f = counts_E.to(importance_E.dtype)
        return RoutingStats(
            tokens_per_expert=counts_E.detach(),
            importance=importance_E.detach(),
            load=load_E.detach(),
            cv_importance=balancing.cv_squared(importance_E.detach()).sqrt(),
            cv_load=balancing.cv_squared(load_E.detach()).sqrt(),
            max_over_mean_load=counts_f.max() / (counts_f.mean() + 1e-10),
            num_dropped=num_dropped,
        )


def moe_output(
    y: Tensor,
    importance_E: Tensor,
    load_E: Tensor,
    counts_E: Tensor,
    num_dropped: int,
    w_importance: float,
    w_load: float,
) -> MoEOutput:
    """The losses (paper Eq. 7 and 11) and statistics of a forward pass, packed with its output."""
    importance_loss = w_importance * balancing.cv_squared(importance_E)
    load_loss = w_load * balancing.cv_squared(load_E)
    stats = routing_stats(counts_E, importance_E, load_E, num_dropped)
    return MoEOutput(y, importance_loss + load_loss, importance_loss, load_loss, stats)


class MoE(nn.Module):
    """Flat MoE: `num_experts` experts d_model -> d_hidden -> d_model, k of them per token.

    Args mirror the paper: k=4 (App. C), noisy gating, w_importance = w_load = 0.1 (App. C.1).
    Non-paper options: `capacity_factor` (None = dropless, the paper's behaviour) and `sparse_grad`
    (None = sparse expert gradients from SPARSE_GRAD_MIN_EXPERTS experts on).
    forward(x, generator=None) takes x of shape (..., d_model) and returns an MoEOutput whose first
    two fields are y and the auxiliary loss; `generator` seeds the gate noise.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 4,
        *,
        noisy_gating: bool = True,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        capacity_factor: float | None = None,
        sparse_grad: bool | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts)
        check_k("k", k, "num_experts", num_experts)
        check_options(w_importance, w_load, capacity_factor)
        self.d_model, self.d_hidden, self.num_experts, self.k = d_model, d_hidden, num_experts, k
        self.w_importance, self.w_load = w_importance, w_load
        self.capacity_factor = capacity_factor
        if sparse_grad is None:
            sparse_grad = num_experts >= SPARSE_GRAD_MIN_EXPERTS
        self.gate = NoisyTopKGate(d_model, num_experts, k, noisy_gating=noisy_gating)
        self.experts = ExpertBank(num_experts, d_model, d_hidden, sparse_grad=sparse_grad)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> MoEOutput:
        x_BD = flatten_input(x, self.d_model)
        num_tokens = x_BD.shape[0]
        gate = self.gate(x_BD, generator=generator)
        expert_N = gate.top_idx_BK.reshape(-1)
        gate_N = gate.top_gates_BK.reshape(-1)
        token_N = torch.arange(num_tokens, device=x.device).repeat_interleave(self.k)
        capacity = expert_capacity(expert_N.numel(), self.num_experts, self.capacity_factor)
        plan = make_plan(expert_N, token_N, self.num_experts, capacity=capacity)
        y_BD = self.experts(x_BD, gate_N, plan, self.k)

        importance_E = balancing.importance(expert_N, gate_N, self.num_experts)
        if gate.prob_in_top_k_BE is not None:
            load_E = gate.prob_in_top_k_BE.sum(0)
        else:
            load_E = plan.counts_E.to(gate_N.dtype)
        return moe_output(
            y_BD.view(x.shape), importance_E, load_E, plan.counts_E, plan.num_dropped,
            self.w_importance, self.w_load,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"k={self.k}, w_importance={self.w_importance}, w_load={self.w_load}"
        )
