"""The flat sparsely-gated MoE layer (Shazeer et al. 2017, Sec. 2-4): noisy top-k gate, dropless
dispatch, expert bank, and the importance + load losses.

    y = Σ_i G(x)_i E_i(x),   L_aux = w_importance · CV(Importance(X))² + w_load · CV(Load(X))²

Load is the smooth estimator Σ_x P(x, i) (Eq. 8-10) when the gate is noisy and k < n, else the true
count (as tensor2tensor/utils/expert_utils.py's noisy_top_k_gating). The layer returns its losses;
it keeps no global state. Its hyper-parameters are a `MoEConfig` (config.py), `layer.config`.

Shape suffixes: B = tokens (all leading dims flattened), D = d_model, E = experts, K = k, N = B*K slots.
"""

from __future__ import annotations

from typing import NamedTuple, Unpack

import torch
from torch import Tensor

from moe_impl.layer import balancing
from moe_impl.layer.base import MoELayer
from moe_impl.layer.config import LayerOptions, MoEConfig, layer_config
from moe_impl.layer.dispatch import DispatchPlan, every_expert_plan, make_plan
from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.gating import Noise, NoisyTopKGate
from moe_impl.layer.grouped import choose_kernel, compute_dtype, current_kernel


class RoutingStats(NamedTuple):
    """Routing statistics of one forward pass, detached, for logging (no recomputation needed)."""

    tokens_per_expert: Tensor  # (E,) int64 slots routed to each expert (the true load)
    importance: Tensor  # (E,) Importance(X), Eq. 6 (Eq. 13 when hierarchical)
    load: Tensor  # (E,) the load the loss used: smooth estimate (Eq. 10 / 14) or true count
    cv_importance: Tensor  # CV, not squared, as the paper's Table 6
    cv_load: Tensor
    max_over_mean_load: Tensor  # max / mean of tokens_per_expert (Table 6's max(Load)/mean(Load))
    num_dropped: int  # slots dropped by a capacity limit; 0 with the paper's dropless default
    # Gate entropy in nats, -Σ_i G(x)_i ln G(x)_i over a token's nonzero gates (at most ln k):
    # the mean over tokens of the whole gate (Eq. 12's products when hierarchical), and for a
    # hierarchical layer the primary gate's mean over tokens and the secondary gates' mean over
    # (token, group) pairs; None where not computed (flat layers have one level).
    gate_entropy: Tensor | None = None
    primary_gate_entropy: Tensor | None = None
    secondary_gate_entropy: Tensor | None = None
    # the float64 sums behind the means, which add over ranks and micro-batches: (Σ_x H(G(x)),
    # tokens) for a flat layer; (Σ_x H(G(x)), Σ_x H(G_primary(x)), Σ_pairs H(G_i(x)), tokens,
    # pairs) for a hierarchical one
    entropy_sums: Tensor | None = None


class MoEOutput(NamedTuple):
    y: Tensor  # same shape as the input
    aux_loss: Tensor  # importance_loss + load_loss, scalar; add it to the task loss
    importance_loss: Tensor  # w_importance · CV(Importance)²
    load_loss: Tensor  # w_load · CV(Load)²
    stats: RoutingStats


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


def token_entropy(gates_BK: Tensor) -> Tensor:
    """(B,) entropy in nats of each row of gate values that sum to 1; a zero gate adds nothing."""
    g = gates_BK.detach().to(torch.float64)
    return -torch.special.xlogy(g, g).sum(-1)


def entropy_sums(
    gates_BK: Tensor, primary_BK: Tensor | None = None, secondary_PK: Tensor | None = None
) -> Tensor:
    """RoutingStats.entropy_sums of one pass: the whole gates `gates_BK` (one row per token), and
    for a hierarchical layer the primary gates (one row per token) and the secondary gates (one
    row per (token, group) pair)."""
    whole = token_entropy(gates_BK).sum()
    if primary_BK is None or secondary_PK is None:
        return torch.stack([whole, whole.new_tensor(gates_BK.shape[0])])
    parts = [whole, token_entropy(primary_BK).sum(), token_entropy(secondary_PK).sum()]
    counts = whole.new_tensor([gates_BK.shape[0], secondary_PK.shape[0]])
    return torch.cat([torch.stack(parts), counts])


def _entropy_means(sums: Tensor | None) -> tuple[Tensor | None, ...]:
    """(gate, primary, secondary) mean entropies from entropy_sums (NaN without tokens), told
    apart by the sums' length, not their values: no read back from the device."""
    if sums is None:
        return None, None, None
    if sums.numel() == 2:
        return sums[0] / sums[1], None, None
    return sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[4]


def routing_stats(
    counts_E: Tensor,
    importance_E: Tensor,
    load_E: Tensor,
    num_dropped: int,
    entropy: Tensor | None = None,
    cv_squared: tuple[Tensor, Tensor] | None = None,
) -> RoutingStats:
    """The statistics of a pass (or of passes whose counts, Importance, Load and `entropy`
    sums were added). `cv_squared`: CV² of (Importance, Load) where the caller computed them
    already (the losses), else computed here."""
    with torch.no_grad():
        counts_f = counts_E.to(importance_E.dtype)
        entropy = None if entropy is None else entropy.detach()
        if cv_squared is None:
            cv_squared = balancing.cv_squared(importance_E), balancing.cv_squared(load_E)
        return RoutingStats(
            tokens_per_expert=counts_E.detach(),
            importance=importance_E.detach(),
            load=load_E.detach(),
            cv_importance=cv_squared[0].detach().sqrt(),
            cv_load=cv_squared[1].detach().sqrt(),
            max_over_mean_load=counts_f.max() / (counts_f.mean() + balancing.EPS),
            num_dropped=num_dropped,
            gate_entropy=(means := _entropy_means(entropy))[0],
            primary_gate_entropy=means[1],
            secondary_gate_entropy=means[2],
            entropy_sums=entropy,
        )


def moe_output(
    y: Tensor,
    importance_E: Tensor,
    load_E: Tensor,
    counts_E: Tensor,
    num_dropped: int,
    config: MoEConfig,
    entropy: Tensor | None = None,
) -> MoEOutput:
    """The losses (paper Eq. 7 and 11) and statistics of a forward pass, packed with its output;
    `entropy`: the pass's entropy_sums."""
    cv2_importance, cv2_load = balancing.cv_squared(importance_E), balancing.cv_squared(load_E)
    importance_loss = config.w_importance * cv2_importance
    load_loss = config.w_load * cv2_load
    stats = routing_stats(
        counts_E, importance_E, load_E, num_dropped, entropy, (cv2_importance, cv2_load)
    )
    return MoEOutput(y, importance_loss + load_loss, importance_loss, load_loss, stats)


def expert_bank(
    config: MoEConfig, first_expert: int = 0, num_local: int | None = None
) -> ExpertBank:
    """The config's experts `first_expert` ... `first_expert + num_local - 1` (all by default),
    initialised as those rows of the whole bank (ExpertBank)."""
    assert config.num_experts is not None  # set when the config was built
    if num_local is None:
        num_local = config.num_experts
    return ExpertBank(
        num_local,
        config.d_model,
        config.d_hidden,
        sparse_grad=config.use_sparse_grad,
        first_expert=first_expert,
        total_experts=config.num_experts,
    )


def wide_refusal(config: MoEConfig, capacity: int | None = None) -> str | None:
    """Why the wide FFN (wide.py) cannot run a layer of `config` with `capacity` slots per expert,
    e.g. "has k=2, num_experts=8"; None where it can: a flat layer whose every token goes to every
    expert (k = E), none dropped (no capacity limit), with dense weight gradients."""
    if config.hierarchical:
        return "is hierarchical"
    if config.k != config.num_experts:
        return f"has k={config.k}, num_experts={config.num_experts}"
    if capacity is not None:
        return f"has capacity_factor={config.capacity_factor}"
    if config.use_sparse_grad:
        return f"has sparse expert gradients (sparse_grad={config.use_sparse_grad})"
    return None


def wide_path(config: MoEConfig, capacity: int | None, device: torch.device) -> bool:
    """Whether the flat layer runs as one wide FFN (wide.py; `wide_refusal` says where it can):
    where forced with `grouped.expert_kernel("wide")` (an error on any other layer), and by the
    automatic choice on CUDA. On CPU the automatic choice keeps the blocked path, which the wide
    one does not beat by more than the spread between runs (docs/performance.md, "The wide FFN for
    k = E")."""
    why = wide_refusal(config, capacity)
    kernel = current_kernel()
    if kernel == "wide" and why is not None:
        raise ValueError(
            "expert_kernel('wide') runs only flat layers with k = num_experts, no capacity limit "
            f"and dense expert gradients; this one {why}"
        )
    return why is None and (kernel == "wide" or (kernel == "auto" and device.type == "cuda"))


def grouped_experts(x_BD: Tensor, config: MoEConfig) -> bool:
    """Whether the experts run as grouped matmuls on this input (grouped.choose_kernel): the
    expert plan is then made with `make_plan(..., grouped=True)`."""
    kernel = choose_kernel(
        x_BD.device, compute_dtype(x_BD), config.d_model, config.d_hidden, config.num_experts
    )
    return kernel == "grouped"


class MoE(MoELayer):
    """Flat MoE: `num_experts` experts d_model -> d_hidden -> d_model, k of them per token.

    Built as `MoE(config)` from a MoEConfig, or from the paper's arguments, whose defaults are
    MoEConfig's: k = 4 (App. C), noisy gating, w_importance = w_load = 0.1 (App. C.1). Non-paper
    options: `capacity_factor` (None = dropless, the paper's behaviour), `sparse_grad` (None =
    sparse expert gradients from SPARSE_GRAD_MIN_EXPERTS experts on) and `gate_precision` (the gate
    matmuls': "float32", "tf32" or "bf16", gate_precision.py). The arguments are checked
    and kept as `self.config`. forward(x, generator=None) takes x of shape (..., d_model) and
    returns an MoEOutput whose first two fields are y and the auxiliary loss; `generator` seeds
    the gate noise.
    """

    HIERARCHICAL = False
    DROPLESS = False

    def __init__(
        self,
        d_model: int | MoEConfig,
        d_hidden: int | None = None,
        num_experts: int | None = None,
        k: int | None = None,
        **options: Unpack[LayerOptions],
    ) -> None:
        layout = dict(d_hidden=d_hidden, num_experts=num_experts, k=k)
        super().__init__(layer_config("MoE", d_model, layout, options))
        cfg = self.config
        assert cfg.num_experts is not None and cfg.k is not None  # set when the config was built
        self.gate = NoisyTopKGate(
            cfg.d_model,
            cfg.num_experts,
            cfg.k,
            noisy_gating=cfg.noisy_gating,
            precision=cfg.gate_precision,
        )
        self.experts = expert_bank(cfg)

    def forward(self, x: Tensor, generator: Noise = None) -> MoEOutput:
        cfg = self.config
        assert cfg.num_experts is not None and cfg.k is not None  # set when the config was built
        x_BD = flatten_input(x, cfg.d_model)
        num_tokens = x_BD.shape[0]
        gate = self.gate(x_BD, generator=generator)
        expert_N = gate.top_idx_BK.reshape(-1)
        gate_N = gate.top_gates_BK.reshape(-1)
        capacity = expert_capacity(expert_N.numel(), cfg.num_experts, cfg.capacity_factor)
        if wide_path(cfg, capacity, x_BD.device):
            gate_BE = gate_N.new_zeros(num_tokens, cfg.num_experts)
            gate_BE = gate_BE.scatter(1, gate.top_idx_BK, gate.top_gates_BK)
            y_BD = self.experts.wide(x_BD, gate_BE)
            counts_E = torch.full((cfg.num_experts,), num_tokens, dtype=torch.long, device=x.device)
            num_dropped = 0
        else:
            plan = self._plan(gate.top_idx_BK, x_BD, capacity)
            y_BD = self.experts(x_BD, gate_N, plan, cfg.k)
            counts_E, num_dropped = plan.counts_E, plan.num_dropped

        importance_E = balancing.importance(expert_N, gate_N, cfg.num_experts)
        load_E = balancing.load(gate.prob_in_top_k_BE, counts_E.to(gate_N.dtype))
        return moe_output(
            y_BD.view(x.shape),
            importance_E,
            load_E,
            counts_E,
            num_dropped,
            cfg,
            entropy_sums(gate.top_gates_BK),
        )

    def _plan(self, top_idx_BK: Tensor, x_BD: Tensor, capacity: int | None) -> DispatchPlan:
        """Where each (token, choice) slot goes among the experts' rows (dispatch.py)."""
        cfg = self.config
        assert cfg.num_experts is not None and cfg.k is not None  # set when the config was built
        num_tokens = x_BD.shape[0]
        grouped = grouped_experts(x_BD, cfg)
        if cfg.k == cfg.num_experts and capacity is None and not grouped and num_tokens > 0:
            return every_expert_plan(top_idx_BK)  # make_plan's, without its sort
        token_N = torch.arange(num_tokens, device=x_BD.device).repeat_interleave(cfg.k)
        expert_N = top_idx_BK.reshape(-1)
        return make_plan(expert_N, token_N, cfg.num_experts, capacity=capacity, grouped=grouped)
