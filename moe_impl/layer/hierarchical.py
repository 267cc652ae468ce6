"""Two-level hierarchical MoE (Shazeer et al. 2017, App. B; tensor2tensor 2017's
DistributedMixtureOfExperts, paper.md §1.4 and §6.10).

    y_H = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_{i,j}(x)                        (Eq. 12)
    Importance_H(X)_{i,j} = Σ_x G_primary(x)_i · G_i(x)_j                        (Eq. 13)
    Load_H(X)_{i,j} = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|              (Eq. 14)

with X^(i) the tokens whose primary gate picked group i and |X^(i)| their true count (t2t divides by
the true count + 1e-10). The CV² of both losses is over all a·b entries. Expert (i, j) is row
i·group_size + j of the expert bank.

The secondary gates run only on the (token, group) pairs the primary gate selected, as blocked
matmuls: per token the router costs O((a + k_primary·b)·d), and no tensor of size tokens x experts
(nor tokens x groups x group_size) is ever built, which is what lets 131072 experts fit.

Shape suffixes: B = tokens, D = d_model, G = groups (a), S = group size (b), P = B·k_primary
(token, group) pairs, M = P·k_secondary expert slots, R = buffer rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_impl.layer import balancing
from moe_impl.layer.dispatch import DispatchPlan, block_weights, dispatch, from_rows, make_plan
from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.flat import (
    SPARSE_GRAD_MIN_EXPERTS,
    MoEOutput,
    check_k,
    check_options,
    check_positive_int,
    expert_capacity,
    flatten_input,
    moe_output,
)
from moe_impl.layer.gating import NOISE_EPSILON, GateOutput, NoisyTopKGate, gate_matmul, noisy_top_k

_EPS = 1e-10


class GroupGates(nn.Module):
    """The a secondary gating networks, one per group, stacked: w_gate, w_noise of shape (a, d, b).
    Zero at init, like every gate (paper App. A)."""

    def __init__(
        self, num_groups: int, d_model: int, group_size: int, k: int, *, noisy_gating: bool
    ) -> None:
        super().__init__()
        self.k = k
        self.noisy_gating = noisy_gating
        self.noise_epsilon = NOISE_EPSILON
        self.w_gate = nn.Parameter(torch.zeros(num_groups, d_model, group_size))
        self.w_noise = nn.Parameter(torch.zeros(num_groups, d_model, group_size))

    def forward(
        self,
        x_BD: Tensor,
        plan: DispatchPlan,
        groups_per_token: int,
        generator: torch.Generator | None = None,
    ) -> GateOutput:
        """Noisy top-k within the group of each (token, group) pair; rows come back in pair order."""
        clean_PS, noise_PS = self.logits(x_BD, plan, groups_per_token)
        return noisy_top_k(
            clean_PS, noise_PS, self.k, noise_epsilon=self.noise_epsilon, generator=generator
        )

    def logits(
        self, x_BD: Tensor, plan: DispatchPlan, groups_per_token: int
    ) -> tuple[Tensor, Tensor | None]:
        """Each pair's clean logits over its group and, when noise applies, its noise logits."""
        x_RD = dispatch(x_BD, plan, groups_per_token)
        clean_PS = self._pair_logits(x_RD, self.w_gate, plan)
        noise_PS = None
        if self.training and self.noisy_gating:
            noise_PS = self._pair_logits(x_RD, self.w_noise, plan)
        return clean_PS, noise_PS

    @staticmethod
    def _pair_logits(x_RD: Tensor, w_GDS: Tensor, plan: DispatchPlan) -> Tensor:
        w_LDS = block_weights(w_GDS, plan)
        logits_LCS = gate_matmul(x_RD.view(plan.num_blocks, plan.block_size, x_RD.shape[-1]), w_LDS)
        return from_rows(logits_LCS.reshape(-1, w_GDS.shape[-1]), plan)


class HierarchicalMoE(nn.Module):
    """Hierarchical MoE: `num_groups` (a) groups of `group_size` (b) experts d_model -> d_hidden ->
    d_model; the primary gate picks k_primary groups, each group's gate k_secondary experts, so a
    token uses k_primary·k_secondary experts (2·2 = 4 in every hierarchical model of the paper).

    Options and return value as MoE; forward(x, generator=None).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_groups: int,
        group_size: int,
        k_primary: int = 2,
        k_secondary: int = 2,
        *,
        noisy_gating: bool = True,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        capacity_factor: float | None = None,
        sparse_grad: bool | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(
            d_model=d_model, d_hidden=d_hidden, num_groups=num_groups, group_size=group_size
        )
        check_k("k_primary", k_primary, "num_groups", num_groups)
        check_k("k_secondary", k_secondary, "group_size", group_size)
        check_options(w_importance, w_load, capacity_factor)
        self.d_model, self.d_hidden = d_model, d_hidden
        self.num_groups, self.group_size = num_groups, group_size
        self.num_experts = num_groups * group_size
        self.k_primary, self.k_secondary = k_primary, k_secondary
        self.w_importance, self.w_load = w_importance, w_load
        self.capacity_factor = capacity_factor
        if sparse_grad is None:
            sparse_grad = self.num_experts >= SPARSE_GRAD_MIN_EXPERTS
        self.primary_gate = NoisyTopKGate(d_model, num_groups, k_primary, noisy_gating=noisy_gating)
        self.secondary_gate = GroupGates(
            num_groups, d_model, group_size, k_secondary, noisy_gating=noisy_gating
        )
        self.experts = ExpertBank(self.num_experts, d_model, d_hidden, sparse_grad=sparse_grad)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> MoEOutput:
        x_BD = flatten_input(x, self.d_model)
        num_tokens, device = x_BD.shape[0], x_BD.device
        group_size, k1, k2 = self.group_size, self.k_primary, self.k_secondary

        # Level 1: (token, group) pairs, token-major; noise is drawn as randn(B, a), then
        # randn(P, b) in pair order.
        primary = self.primary_gate(x_BD, generator=generator)
        group_P = primary.top_idx_BK.reshape(-1)
        token_P = torch.arange(num_tokens, device=device).repeat_interleave(k1)
        group_plan = make_plan(group_P, token_P, self.num_groups)
        secondary = self.secondary_gate(x_BD, group_plan, k1, generator=generator)

        # Level 2: expert slots; the gate of expert (i, j) is G_primary(x)_i · G_i(x)_j (Eq. 12).
        expert_M = (group_P[:, None] * group_size + secondary.top_idx_BK).reshape(-1)
        gate_M = (primary.top_gates_BK.reshape(-1, 1) * secondary.top_gates_BK).reshape(-1)
        token_M = token_P.repeat_interleave(k2)
        capacity = expert_capacity(expert_M.numel(), self.num_experts, self.capacity_factor)
        plan = make_plan(expert_M, token_M, self.num_experts, capacity=capacity)
        y_BD = self.experts(x_BD, gate_M, plan, k1 * k2)

        importance_E = balancing.importance(expert_M, gate_M, self.num_experts)  # Eq. 13
        load_E = self._load(primary, secondary, group_P, group_plan, plan, gate_M.dtype)
        return moe_output(
            y_BD.view(x.shape), importance_E, load_E, plan.counts_E, plan.num_dropped,
            self.w_importance, self.w_load,
        )  # fmt: skip

    def _load(
        self,
        primary: GateOutput,
        secondary: GateOutput,
        group_P: Tensor,
        group_plan: DispatchPlan,
        plan: DispatchPlan,
        dtype: torch.dtype,
    ) -> Tensor:
        """Load_H of Eq. 14, flattened to (a·b,): the secondary load of each group (smooth, summed
        over the group's pairs, or the true count) times primary smooth load / primary true count."""
        primary_count_G = group_plan.counts_E.to(dtype)
        if primary.prob_in_top_k_BE is not None:
            primary_load_G = primary.prob_in_top_k_BE.sum(0)
        else:
            primary_load_G = primary_count_G
        if secondary.prob_in_top_k_BE is not None:
            secondary_load_GS = secondary.prob_in_top_k_BE.new_zeros(
                self.num_groups, self.group_size
            ).index_add(0, group_P, secondary.prob_in_top_k_BE)
        else:
            secondary_load_GS = plan.counts_E.to(dtype).view(self.num_groups, self.group_size)
        scale_G = primary_load_G / (primary_count_G + _EPS)
        return (secondary_load_GS * scale_G[:, None]).reshape(-1)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_groups={self.num_groups}, "
            f"group_size={self.group_size}, k_primary={self.k_primary}, "
            f"k_secondary={self.k_secondary}, w_importance={self.w_importance}, w_load={self.w_load}"
        )
