"""Two-level hierarchical MoE (Shazeer et al. 2017, App. B; the 2017 DistributedMixtureOfExperts
of tensor2tensor/utils/expert_utils.py).

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

from typing import Unpack

import torch
from torch import Tensor

from moe_impl.layer import balancing
from moe_impl.layer.base import MoELayer
from moe_impl.layer.config import LayerOptions, MoEConfig, layer_config
from moe_impl.layer.dispatch import (
    DispatchPlan,
    add_rows,
    dispatch,
    from_rows,
    make_plan,
    select_rows,
)
from moe_impl.layer.flat import (
    MoEOutput,
    entropy_sums,
    expert_bank,
    expert_capacity,
    flatten_input,
    grouped_experts,
    moe_output,
)
from moe_impl.layer.gate_precision import effective_precision, precision_matmul
from moe_impl.layer.gating import GateOutput, GatingNetwork, Noise, NoisyTopKGate, gate_dtype
from moe_impl.layer.workspace import Workspace, bmm, empty


class GroupGates(GatingNetwork):
    """The a secondary gating networks, one per group, stacked: w_gate, w_noise of shape (a, d, b).
    Their large tensors (the pairs' rows, the logits, the weight gradients: 33 MB each at 256 x 512
    groups of d = 64) live in a workspace reused across steps (workspace.py)."""

    def __init__(
        self,
        num_groups: int,
        d_model: int,
        group_size: int,
        k: int,
        *,
        noisy_gating: bool,
        precision: str = "float32",
    ) -> None:
        super().__init__(
            (num_groups, d_model, group_size), k, noisy_gating=noisy_gating, precision=precision
        )
        self.workspace = Workspace()

    def forward(
        self,
        x_BD: Tensor,
        plan: DispatchPlan,
        groups_per_token: int,
        generator: Noise = None,
    ) -> GateOutput:
        """Noisy top-k within the group of each (token, group) pair; rows come back in pair order."""
        return self.select(*self.logits(x_BD, plan, groups_per_token), generator=generator)

    def logits(
        self,
        x_BD: Tensor,
        plan: DispatchPlan,
        groups_per_token: int,
        precision: str | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Each pair's clean logits over its group and, when noise applies, its noise logits, at
        `precision` (None: the network's own)."""
        precision = precision or self.precision
        x_RD = dispatch(x_BD, plan, groups_per_token, self.workspace)
        clean_PS = self._pair_logits(x_RD, self.w_gate, plan, precision)
        noise_PS = None
        if self.uses_noise:
            noise_PS = self._pair_logits(x_RD, self.w_noise, plan, precision)
        return clean_PS, noise_PS

    def _pair_logits(
        self, x_RD: Tensor, w_GDS: Tensor, plan: DispatchPlan, precision: str
    ) -> Tensor:
        x_LCD = x_RD.view(plan.num_blocks, plan.block_size, x_RD.shape[-1])
        logits_LCS = block_gate_matmul(x_LCD, w_GDS, plan.block_expert_L, self.workspace, precision)
        return from_rows(logits_LCS.reshape(-1, w_GDS.shape[-1]), plan, self.workspace)


def _block_bmm(workspace: Workspace | None, a: Tensor, b: Tensor, precision: str) -> Tensor:
    """a @ b (batched) into workspace memory at `precision` (gate_precision.py)."""
    if effective_precision(precision, a.device) == "float32":
        return bmm(workspace, a, b)
    return precision_matmul(a, b, precision, workspace)


class _BlockGateMatmul(torch.autograd.Function):
    """x_LCD @ w[block l's group], as gate_matmul computes it (gate_dtype, autocast off, the
    matmuls at `precision`), the backward written by hand so that every large tensor, the weights'
    dense gradient included, goes into the workspace (autograd's gave a fresh (a, d, b) tensor per
    step)."""

    @staticmethod
    def forward(ctx, x_LCD, w_GDS, block_group_L, workspace, precision):
        dtype = gate_dtype(x_LCD)
        with torch.autocast(device_type=x_LCD.device.type, enabled=False):
            x_c, w_c = x_LCD.to(dtype), w_GDS.to(dtype)
            w_LDS = w_c if block_group_L is None else select_rows(w_c, block_group_L)
            out = _block_bmm(workspace, x_c, w_LDS, precision)
        ctx.save_for_backward(x_c, w_LDS, block_group_L)
        ctx.workspace, ctx.precision = workspace, precision
        ctx.dtypes, ctx.w_shape = (x_LCD.dtype, w_GDS.dtype), w_GDS.shape
        return out

    @staticmethod
    def backward(ctx, g_LCS: Tensor):
        x_c, w_LDS, block_group_L = ctx.saved_tensors
        ws, precision = ctx.workspace, ctx.precision
        g_LCS = g_LCS.to(x_c.dtype).contiguous()
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = _block_bmm(ws, g_LCS, w_LDS.transpose(1, 2), precision).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            g_w = _block_bmm(ws, x_c.transpose(1, 2), g_LCS, precision)
            if block_group_L is not None:
                g_w = add_rows(ctx.w_shape, block_group_L, g_w, out=empty(ws, ctx.w_shape, g_w))
            g_w = g_w.to(ctx.dtypes[1])
        return g_x, g_w, None, None, None


def block_gate_matmul(
    x_LCD: Tensor,
    w_GDS: Tensor,
    block_group_L: Tensor | None,
    workspace: Workspace | None = None,
    precision: str = "float32",
) -> Tensor:
    """The logits of every block's rows under its group's gate weights (block l is group l where
    block_group_L is None), in at least float32, the matmuls at `precision` (gate_precision.py);
    `workspace` holds the large tensors."""
    return _BlockGateMatmul.apply(x_LCD, w_GDS, block_group_L, workspace, precision)


def expert_index(group_P: Tensor, group_size: int, top_idx_PK: Tensor) -> Tensor:
    """Expert id (row of the expert bank) of each (pair, secondary choice), flat: group·b + j."""
    return (group_P[:, None] * group_size + top_idx_PK).reshape(-1)


class HierarchicalMoE(MoELayer):
    """Hierarchical MoE: `num_groups` (a) groups of `group_size` (b) experts d_model -> d_hidden ->
    d_model; the primary gate picks k_primary groups, each group's gate k_secondary experts, so a
    token uses k_primary·k_secondary experts (2·2 = 4 in every hierarchical model of the paper).

    Built as MoE: `HierarchicalMoE(config)` or from the paper's arguments; forward(x,
    generator=None).
    """

    HIERARCHICAL = True
    DROPLESS = False

    def __init__(
        self,
        d_model: int | MoEConfig,
        d_hidden: int | None = None,
        num_groups: int | None = None,
        group_size: int | None = None,
        k_primary: int | None = None,
        k_secondary: int | None = None,
        **options: Unpack[LayerOptions],
    ) -> None:
        layout = dict(
            d_hidden=d_hidden,
            num_groups=num_groups,
            group_size=group_size,
            k_primary=k_primary,
            k_secondary=k_secondary,
        )
        super().__init__(layer_config("HierarchicalMoE", d_model, layout, options))
        cfg = self.config
        assert cfg.num_groups is not None and cfg.group_size is not None  # set when built
        assert cfg.k_primary is not None and cfg.k_secondary is not None
        noisy, precision = cfg.noisy_gating, cfg.gate_precision
        self.primary_gate = NoisyTopKGate(
            cfg.d_model, cfg.num_groups, cfg.k_primary, noisy_gating=noisy, precision=precision
        )
        self.secondary_gate = GroupGates(
            cfg.num_groups,
            cfg.d_model,
            cfg.group_size,
            cfg.k_secondary,
            noisy_gating=noisy,
            precision=precision,
        )
        self.experts = expert_bank(cfg)

    def forward(self, x: Tensor, generator: Noise = None) -> MoEOutput:
        cfg = self.config
        x_BD = flatten_input(x, cfg.d_model)
        num_tokens, device = x_BD.shape[0], x_BD.device
        group_size, k1, k2 = cfg.group_size, cfg.k_primary, cfg.k_secondary
        # for mypy: the config was built with them (MoEConfig fills in num_experts)
        assert group_size is not None and k1 is not None and k2 is not None
        assert cfg.num_groups is not None and cfg.num_experts is not None

        # Level 1: (token, group) pairs, token-major; noise is drawn as randn(B, a), then
        # randn(P, b) in pair order.
        primary = self.primary_gate(x_BD, generator=generator)
        group_P = primary.top_idx_BK.reshape(-1)
        token_P = torch.arange(num_tokens, device=device).repeat_interleave(k1)
        group_plan = make_plan(group_P, token_P, cfg.num_groups)
        secondary = self.secondary_gate(x_BD, group_plan, k1, generator=generator)

        # Level 2: expert slots; the gate of expert (i, j) is G_primary(x)_i · G_i(x)_j (Eq. 12).
        expert_M = expert_index(group_P, group_size, secondary.top_idx_BK)
        gate_M = (primary.top_gates_BK.reshape(-1, 1) * secondary.top_gates_BK).reshape(-1)
        token_M = token_P.repeat_interleave(k2)
        capacity = expert_capacity(expert_M.numel(), cfg.num_experts, cfg.capacity_factor)
        grouped = grouped_experts(x_BD, cfg)  # the experts' plan only: the group plan stays blocked
        plan = make_plan(expert_M, token_M, cfg.num_experts, capacity=capacity, grouped=grouped)
        y_BD = self.experts(x_BD, gate_M, plan, k1 * k2)

        # Eq. 13 and 14: |X^(i)| is the true count of pairs in group i (the group plan's counts)
        dtype = gate_M.dtype
        importance_E = balancing.importance(expert_M, gate_M, cfg.num_experts)
        primary_count_G = group_plan.counts_E.to(dtype)
        primary_load_G = balancing.load(primary.prob_in_top_k_BE, primary_count_G)
        counts_GS = plan.counts_E.to(dtype).view(cfg.num_groups, group_size)
        secondary_load_GS = balancing.group_load(secondary.prob_in_top_k_BE, group_P, counts_GS)
        load_E = balancing.hierarchical_load(secondary_load_GS, primary_load_G, primary_count_G)
        entropy = entropy_sums(
            gate_M.view(num_tokens, k1 * k2), primary.top_gates_BK, secondary.top_gates_BK
        )
        return moe_output(
            y_BD.view(x.shape), importance_E, load_E, plan.counts_E, plan.num_dropped, cfg, entropy
        )
