"""The hierarchical MoE with its groups spread over ranks, as the paper ran it (App. B, §3.1: "the
primary gating network is data-parallel, and each secondary MoE resides on one device"; the 2017
DistributedMixtureOfExperts of tensor2tensor/utils/expert_utils.py).

Every rank holds the primary gate (replicated, gradient summed over ranks) and a contiguous shard of
the groups: their secondary gating networks and their experts (gradients stay on the rank).
A forward pass on rank r, for its own tokens:

1. the primary gate picks k_primary groups per token;
2. each (token, group) pair's input row travels to the group's rank with its primary gate value
   (all_to_all, variable splits, dropless);
3. there the group's gate picks k_secondary experts, which run, and the pair's output
   Σ_j G_i(x)_j E_ij(x) travels back: one row per pair, not per expert (paper §3.2's bandwidth);
4. the source combines the pairs with the primary gates (Eq. 12);
5. Importance_H (Eq. 13) and Load_H (Eq. 14) of the owner's experts are computed where the pairs
   are, with the primary smooth load summed over ranks; the a·b vectors are then summed over ranks
   (each rank filling its own entries) so every rank takes the CV² over all a·b experts.

Same weights -> the single-process `HierarchicalMoE` on the concatenated batch (see moe.py for the
gradient convention and `replicate_noise`).

Shape suffixes: B = local tokens, D = d_model, G = groups (a), S = group size (b), P = local pairs
(B·k_primary), M = pairs received, Q = expert slots of the received pairs (M·k_secondary),
E = experts (a·b).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_impl.layer import balancing
from moe_impl.layer.base import MoELayer
from moe_impl.layer.config import MoEConfig
from moe_impl.layer.dispatch import make_plan
from moe_impl.layer.flat import (
    MoEOutput,
    expert_bank,
    flatten_input,
    grouped_experts,
    moe_output,
    token_entropy,
)
from moe_impl.layer.gating import Noise, NoisyTopKGate, standard_normal
from moe_impl.layer.hierarchical import GroupGates, expert_index
from moe_impl.parallel.comm import exchange, rank_and_size, replicated_sum
from moe_impl.parallel.moe import global_normal
from moe_impl.parallel.routing import combine, gather_slots, route, shard_bounds
from moe_impl.parallel.shard import mark_sharded


def split_entropy_sums(primary_BK: Tensor, gate_M: Tensor, secondary_MK: Tensor) -> Tensor:
    """flat.entropy_sums of this rank's part when a token's two levels live on different ranks:
    its tokens' primary gates `primary_BK`, and the pairs it received, their primary gate values
    `gate_M` and secondary gates `secondary_MK`. The whole gate's entropy splits by the chain rule,
    H(G) = H(G_primary) + Σ_i G_primary(x)_i H(G_i(x)) (each G_i(x) sums to 1, Eq. 12), so the
    sums over ranks equal the single-process layer's."""
    h_primary = token_entropy(primary_BK).sum()
    h_secondary_M = token_entropy(secondary_MK)
    weighted = (gate_M.detach().to(torch.float64) * h_secondary_M).sum()
    sums = [h_primary + weighted, h_primary, h_secondary_M.sum()]
    counts = [primary_BK.shape[0], secondary_MK.shape[0]]
    return torch.cat([torch.stack(sums), h_primary.new_tensor(counts)])


def _layout(cfg: MoEConfig) -> tuple[int, int, int, int, int]:
    """(num_groups, group_size, num_experts, k_primary, k_secondary) of a built hierarchical config
    (MoEConfig fills in num_experts and the k's)."""
    a, b, n = cfg.num_groups, cfg.group_size, cfg.num_experts
    k1, k2 = cfg.k_primary, cfg.k_secondary
    assert a is not None and b is not None and n is not None and k1 is not None and k2 is not None
    return a, b, n, k1, k2


class DistributedHierarchicalMoE(MoELayer):
    """Expert-parallel drop-in for `moe_impl.HierarchicalMoE` (dropless), a shard of groups per
    rank, built as DistributedMoE: `DistributedHierarchicalMoE(config, group=None,
    replicate_noise=False)`. `secondary_gate.*` and `experts.*` hold this rank's groups
    `first_group` ... ."""

    HIERARCHICAL = True
    DROPLESS = True

    def __init__(self, config: MoEConfig, *, group=None, replicate_noise: bool = False) -> None:
        super().__init__(config)
        cfg = self.config
        # for mypy: set when the config was built (MoEConfig fills in num_experts)
        assert cfg.num_groups is not None and cfg.group_size is not None
        assert cfg.k_primary is not None and cfg.k_secondary is not None
        assert cfg.num_experts is not None
        noisy_gating, precision = cfg.noisy_gating, cfg.gate_precision
        rank, world = rank_and_size(group)
        self.group, self.replicate_noise = group, replicate_noise
        self.bounds = shard_bounds(cfg.num_groups, world)
        self.first_group = self.bounds[rank]
        local_groups = self.bounds[rank + 1] - self.first_group
        self.primary_gate = NoisyTopKGate(
            cfg.d_model,
            cfg.num_groups,
            cfg.k_primary,
            noisy_gating=noisy_gating,
            precision=precision,
        )
        self.secondary_gate = GroupGates(
            local_groups,
            cfg.d_model,
            cfg.group_size,
            cfg.k_secondary,
            noisy_gating=noisy_gating,
            precision=precision,
        )
        self.experts = expert_bank(
            cfg, self.first_group * cfg.group_size, local_groups * cfg.group_size
        )
        for p in (self.secondary_gate.w_gate, self.secondary_gate.w_noise):
            mark_sharded(p, self.first_group, cfg.num_groups)
        for p in (self.experts.w_in, self.experts.w_out):
            mark_sharded(p, self.experts.first_expert, cfg.num_experts)

    def forward(self, x: Tensor, generator: Noise = None) -> MoEOutput:
        cfg = self.config
        x_BD = flatten_input(x, cfg.d_model)
        num_tokens, device = x_BD.shape[0], x_BD.device
        num_groups, group_size, num_experts, k1, k2 = _layout(cfg)
        local_groups = self.secondary_gate.w_gate.shape[0]

        # Level 1, on the token's rank. With replicate_noise the draws are the single-process
        # layer's: randn(global tokens, a), then randn(global pairs, b) in pair order.
        clean_BG, noise_BG = self.primary_gate.logits(x_BD)
        replicate = self.replicate_noise and noise_BG is not None
        normal_BG, offset, total = None, 0, 0
        if replicate:
            normal_BG, offset, total = global_normal(
                num_tokens, num_groups if num_groups > 1 else 0, generator, clean_BG, self.group
            )
        primary = self.primary_gate.select(
            clean_BG, noise_BG, generator, normal_BG if num_groups > 1 else None
        )
        group_P = primary.top_idx_BK.reshape(-1)
        gate_P = primary.top_gates_BK.reshape(-1)
        r = route(group_P, self.bounds, self.group)
        send = [gather_slots(x_BD, r, k1), gate_P[r.order_N], group_P[r.order_N]]
        if replicate:  # each pair's global index, to find its row of the replicated noise
            send.append(offset * k1 + r.order_N)
        x_MD, gate_M, group_M, *pair_M = exchange(send, r.send, r.recv, self.group)

        # Level 2, on the group's rank: secondary gate, experts, Σ_j G_i(x)_j E_ij(x) per pair
        local_group_M = group_M - self.first_group
        num_pairs = local_group_M.numel()
        pair_plan = make_plan(local_group_M, torch.arange(num_pairs, device=device), local_groups)
        clean_MS, noise_MS = self.secondary_gate.logits(x_MD, pair_plan, 1)
        normal_MS = None
        if replicate and group_size > 1:
            normal_MS = standard_normal((total * k1, group_size), generator, clean_MS)[pair_M[0]]
        secondary = self.secondary_gate.select(clean_MS, noise_MS, generator, normal_MS)
        expert_Q = expert_index(local_group_M, group_size, secondary.top_idx_BK)
        gate_Q = secondary.top_gates_BK.reshape(-1)
        token_Q = torch.arange(num_pairs, device=device).repeat_interleave(k2)
        grouped = grouped_experts(x_BD, cfg)  # the experts' plan only: the pair plan stays blocked
        plan = make_plan(expert_Q, token_Q, local_groups * group_size, grouped=grouped)
        y_MD = self.experts(x_MD, gate_Q, plan, k2)
        (y_back_PD,) = exchange([y_MD], r.recv, r.send, self.group)
        y_BD = combine(y_back_PD, r, gate_P, k1, x_BD.dtype)

        # Eq. 13 and 14. Importance and the secondary load of this rank's experts, padded to a·b,
        # and the primary smooth load are summed over ranks in one all_reduce; Load_H is then
        # computed alike on every rank from the sums (replicated_sum's gradient convention needs
        # every use of a sum to be replicated).
        dtype = gate_P.dtype
        num_local = local_groups * group_size
        importance_Q = gate_M.repeat_interleave(k2) * gate_Q
        importance_local = balancing.importance(expert_Q, importance_Q, num_local)
        counts_local = plan.counts_E.to(dtype)
        secondary_load_local = balancing.group_load(
            secondary.prob_in_top_k_BE, local_group_M, counts_local.view(local_groups, group_size)
        ).reshape(-1)
        local = torch.stack([importance_local, secondary_load_local, counts_local])
        first = self.experts.first_expert
        pad_before = local.new_zeros(3, first)
        pad_after = local.new_zeros(3, num_experts - first - num_local)
        parts = [torch.cat([pad_before, local, pad_after], dim=1).reshape(-1)]
        if primary.prob_in_top_k_BE is not None:
            parts.append(primary.prob_in_top_k_BE.sum(0))
        summed = replicated_sum(torch.cat(parts), self.group)
        importance_E, secondary_load_E, counts_E = summed[: 3 * num_experts].view(3, -1)
        count_G = counts_E.view(num_groups, group_size).sum(1) / k2  # |X^(i)|: pairs per group
        primary_load_G = summed[3 * num_experts :] if len(parts) > 1 else count_G
        load_E = balancing.hierarchical_load(
            secondary_load_E.view(num_groups, group_size), primary_load_G, count_G
        )
        entropy = replicated_sum(
            split_entropy_sums(primary.top_gates_BK, gate_M, secondary.top_gates_BK), self.group
        )
        return moe_output(
            y_BD.view(x.shape), importance_E, load_E, counts_E.round().long(), 0, cfg, entropy
        )

    def extra_repr(self) -> str:
        first, local = self.first_group, self.secondary_gate.w_gate.shape[0]
        return f"{self.config.describe()}, local_groups=[{first}, {first + local})"
