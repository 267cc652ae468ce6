"""The flat MoE with its experts spread over ranks (paper §3.1, "mixed data and model parallelism").

Every rank holds the gating network (data-parallel: its gradient is summed over ranks, sync.py) and
a contiguous shard of the experts (each expert on exactly one rank; its gradient stays there).
A forward pass on rank r, for its own tokens:

1. the noisy top-k gate picks k experts per token (paper Eq. 3-5);
2. each (token, expert) slot's input row travels to the expert's rank (all_to_all, variable splits,
   nothing dropped), the owner runs its experts on every row it received, the outputs travel back;
3. the outputs are combined with the gates where the token lives (Eq. 1);
4. Importance, Load and the true counts are summed over ranks before the CV²: the CV is over the
   global batch, as tensor2tensor sums them over datashards (tensor2tensor/utils/expert_utils.py).

With the same weights it computes the single-process `MoE` on the concatenation of every rank's
tokens (rank order): the same y rows, the same aux loss on every rank, and, once the replicated
gradients are summed over ranks, the same gradients (tests/test_parallel.py). Gate noise is drawn
per rank from `generator` (as each tensor2tensor datashard does); `replicate_noise=True` draws the
noise of the whole global batch on every rank and keeps this rank's rows, which reproduces the
single-process noise exactly at world-size times the sampling cost.

Shape suffixes: B = local tokens, D = d_model, E = experts, K = k, N = local slots (B·K),
M = slots received from all ranks, W = ranks.
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
    entropy_sums,
    expert_bank,
    flatten_input,
    grouped_experts,
    moe_output,
)
from moe_impl.layer.gating import Noise, NoisyTopKGate, standard_normal
from moe_impl.parallel.comm import all_gather_sizes, exchange, rank_and_size, replicated_sum
from moe_impl.parallel.routing import combine, gather_slots, route, shard_bounds
from moe_impl.parallel.shard import mark_sharded


def global_normal(
    rows: int, cols: int, generator, like: Tensor, group=None
) -> tuple[Tensor, int, int]:
    """This rank's rows of randn(global rows, cols) drawn from `generator` (seeded alike on every
    rank), with the rank's row offset and the global row count; cols=0 draws nothing."""
    rank, _ = rank_and_size(group)
    sizes = all_gather_sizes(rows, like.device, group)
    offset, total = sum(sizes[:rank]), sum(sizes)
    normal = standard_normal((total, cols), generator, like)
    # a copy of this rank's rows: the whole draw is not kept alive until the backward
    return normal[offset : offset + rows].clone(), offset, total


class DistributedMoE(MoELayer):
    """Expert-parallel drop-in for `moe_impl.MoE`, built from its config (dropless only):
    `DistributedMoE(config, group=None, replicate_noise=False)`, `group` a torch.distributed
    process group (None = the default one). Parameter names are MoE's; `experts.w_in` /
    `experts.w_out` hold this rank's experts `experts.first_expert` ...
    (moe_impl.parallel.load_full_state_dict loads a single-process state dict).
    forward(x, generator=None) -> MoEOutput with global aux loss and statistics."""

    HIERARCHICAL = False
    DROPLESS = True

    def __init__(self, config: MoEConfig, *, group=None, replicate_noise: bool = False) -> None:
        super().__init__(config)
        cfg = self.config
        assert cfg.num_experts is not None and cfg.k is not None  # set when the config was built
        rank, world = rank_and_size(group)
        self.group, self.replicate_noise = group, replicate_noise
        self.bounds = shard_bounds(cfg.num_experts, world)
        first, stop = self.bounds[rank], self.bounds[rank + 1]
        self.gate = NoisyTopKGate(
            cfg.d_model,
            cfg.num_experts,
            cfg.k,
            noisy_gating=cfg.noisy_gating,
            precision=cfg.gate_precision,
        )
        self.experts = expert_bank(cfg, first, stop - first)
        mark_sharded(self.experts.w_in, first, cfg.num_experts)
        mark_sharded(self.experts.w_out, first, cfg.num_experts)

    def forward(self, x: Tensor, generator: Noise = None) -> MoEOutput:
        cfg = self.config
        x_BD = flatten_input(x, cfg.d_model)
        num_tokens, k, num_experts = x_BD.shape[0], cfg.k, cfg.num_experts
        assert k is not None and num_experts is not None  # set when the config was built
        clean_BE, noise_BE = self.gate.logits(x_BD)
        normal_BE = None
        if self.replicate_noise and noise_BE is not None and num_experts > 1:
            normal_BE, _, _ = global_normal(
                num_tokens, num_experts, generator, clean_BE, self.group
            )
        gate = self.gate.select(clean_BE, noise_BE, generator, normal_BE)
        expert_N = gate.top_idx_BK.reshape(-1)
        gate_N = gate.top_gates_BK.reshape(-1)

        # to the experts' ranks, through the local experts, and back (paper §3.1)
        r = route(expert_N, self.bounds, self.group)
        x_recv_MD, expert_M = exchange(
            [gather_slots(x_BD, r, k), expert_N[r.order_N]], r.send, r.recv, self.group
        )
        local_M = expert_M - self.experts.first_expert
        plan = make_plan(
            local_M,
            torch.arange(local_M.numel(), device=x.device),
            self.experts.w_in.shape[0],
            grouped=grouped_experts(x_BD, cfg),
        )
        y_recv_MD = self.experts.slot_outputs(x_recv_MD, plan, 1)
        (y_back_ND,) = exchange([y_recv_MD], r.recv, r.send, self.group)
        y_BD = combine(y_back_ND, r, gate_N, k, x_BD.dtype)

        # Importance (Eq. 6), Load (Eq. 10, or the true count) and counts over the global batch
        importance_E = balancing.importance(expert_N, gate_N, num_experts)
        counts_E = torch.bincount(expert_N, minlength=num_experts).to(importance_E.dtype)
        load_E = balancing.load(gate.prob_in_top_k_BE, counts_E)
        total = replicated_sum(torch.stack([importance_E, load_E, counts_E]), self.group)
        entropy = replicated_sum(entropy_sums(gate.top_gates_BK), self.group)
        return moe_output(
            y_BD.view(x.shape), total[0], total[1], total[2].round().long(), 0, cfg, entropy
        )

    def extra_repr(self) -> str:
        first = self.experts.first_expert
        local = f"local_experts=[{first}, {first + self.experts.w_in.shape[0]})"
        return f"{self.config.describe()}, {local}"
