"""Analytic parameter, ops and FLOP counts of the paper's LSTM / MoE language models.

Shazeer et al. 2017, Sec. 5.1 (ops/timestep, TFLOPS/GPU), App. C and D (model shapes); the counting
formulas (docs/design.md) reproduce every entry of Tables 7 and 8. Plain Python integers: no torch
and no I/O, so analysis code can import it anywhere. What a model is: config.py (`ModelConfig`);
the paper's models: presets.py.

Not counted anywhere (the paper's numbers reproduce without them): biases, elementwise work
(LSTM cell nonlinearities, ReLU, sigmoid, the gates' softmax and noise, residual adds) and the
embedding lookup.
"""

from __future__ import annotations

from moe_impl.model.config import ModelConfig

FLOPS_PER_MULTIPLY_ADD = 2
BACKWARD_TO_FORWARD = 2  # backward of a matmul = two matmuls of the forward's size


def lstm_params(d_in: int, units: int, projection: int | None) -> int:
    """Weights of one LSTM layer (docs/design.md): 4·n·(i+n), or 4·n·(i+p) + n·p with projection p.

    Four gates, each fed the input (i) and the recurrent output (n, or p when projected, Sak et al.
    2014); the projection itself is n x p. Biases and peepholes are not counted.
    """
    if projection is None:
        return 4 * units * (d_in + units)
    return 4 * units * (d_in + projection) + units * projection


def expert_params(cfg: ModelConfig) -> int:
    """Weights of one expert: d -> h (-> h ...) -> d, i.e. 2·d·h for the one-hidden-layer expert.

    App. C: no biases; MoE-1-Deep's expert has 4 hidden layers (d·h + 3·h·h + h·d).
    """
    if cfg.moe == "none":
        return 0
    d, h = cfg.d_model, cfg.d_hidden
    return d * h + (cfg.expert_hidden_layers - 1) * h * h + h * d


def gate_params(cfg: ModelConfig) -> int:
    """Gating weights: W_g and W_noise (Eq. 4), 2·d·n per gating network.

    Hierarchical (App. B): the primary gate over a groups plus one secondary gate per group,
    2·d·a + a·2·d·b. The dense baselines have no gate.
    """
    d = cfg.d_model
    if cfg.moe == "flat":
        return 2 * d * cfg.num_experts
    if cfg.moe == "hierarchical":
        assert cfg.num_groups is not None and cfg.group_size is not None  # checked when built
        return 2 * d * cfg.num_groups + cfg.num_groups * 2 * d * cfg.group_size
    return 0


def gate_ops(cfg: ModelConfig) -> int:
    """Gating multiply-adds per timestep: all of W_g and W_noise are applied to every token.

    Hierarchical: the primary gate plus only the k_primary selected groups' secondary gates,
    2·d·a + k_primary·2·d·b (secondary gates run where the token is dispatched, App. B).
    """
    d = cfg.d_model
    if cfg.moe == "hierarchical":
        assert cfg.num_groups is not None and cfg.group_size is not None  # checked when built
        assert cfg.k_primary is not None
        return 2 * d * cfg.num_groups + cfg.k_primary * 2 * d * cfg.group_size
    return gate_params(cfg)


def active_experts(cfg: ModelConfig) -> int:
    """Experts evaluated per token: k (flat), k_primary·k_secondary (hierarchical), 1 (dense)."""
    if cfg.moe == "flat":
        assert cfg.k is not None  # checked when built
        return cfg.k
    if cfg.moe == "hierarchical":
        assert cfg.k_primary is not None and cfg.k_secondary is not None  # checked when built
        return cfg.k_primary * cfg.k_secondary
    return 1 if cfg.moe == "dense" else 0


def expert_ops_per_timestep(cfg: ModelConfig) -> int:
    """Expert multiply-adds per timestep: active experts x weights per expert."""
    return active_experts(cfg) * expert_params(cfg)


def lstm_params_total(cfg: ModelConfig) -> int:
    """All LSTM weights; every layer reads d_model (see ModelConfig)."""
    return sum(lstm_params(cfg.d_model, n, p) for n, p in cfg.lstm_layers)


def params_excl_embedding_softmax(cfg: ModelConfig) -> int:
    """#Parameters excluding embedding and softmax (Tables 1, 7, 8): LSTMs + experts + gates."""
    return lstm_params_total(cfg) + cfg.num_experts * expert_params(cfg) + gate_params(cfg)


def total_params(cfg: ModelConfig) -> int:
    """Total #Parameters (Tables 7, 8): adds the untied embedding and softmax, 2·V·d.

    NOTE: no softmax bias; Table 7's totals reproduce without one (and V = 0.0008B would not show).
    """
    return params_excl_embedding_softmax(cfg) + 2 * cfg.vocab_size * cfg.d_model


def ops_per_timestep(cfg: ModelConfig) -> int:
    """ops/timestep as Sec. 5.1 defines it: forward multiply-adds per token, excluding the softmax.

    One multiply-add = one op, forward only, embedding lookup = 0. Every LSTM weight is used once
    per token (lstm_params); each active expert uses all its weights once; gating per gate_ops.
    """
    return lstm_params_total(cfg) + expert_ops_per_timestep(cfg) + gate_ops(cfg)


def train_softmax_ops_per_token(cfg: ModelConfig) -> int:
    """Forward multiply-adds of the training softmax per token: d·(S+1) sampled, or d·V full.

    Sampled softmax (App. C.1 "importance sampling"): logits for the S shared samples plus the
    target word. The full-vocabulary softmax is used when softmax_samples is None or 0.
    """
    s = cfg.softmax_samples
    return cfg.d_model * (s + 1 if s else cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token as the TFLOPS/GPU column counts them (Sec. 5.1).

        FLOPs = 2 · (1 + 2) · (ops_per_timestep + training softmax multiply-adds)

    A multiply-add is 2 FLOPs; backward = 2x forward (gradients w.r.t. inputs and weights) for
    every layer, gates included. The softmax is the sampled one of train_softmax_ops_per_token.
    NOTE: App. D's recomputation of the expert hidden layers in the backward pass (100B models) is
    not counted; neither is the work of the optimizer update.
    """
    forward = ops_per_timestep(cfg) + train_softmax_ops_per_token(cfg)
    return FLOPS_PER_MULTIPLY_ADD * (1 + BACKWARD_TO_FORWARD) * forward


def moe_layer_train_flops_per_token(
    d_model: int,
    d_hidden: int,
    num_active_experts: int,
    num_gate_outputs: int,
    expert_hidden_layers: int = 1,
) -> int:
    """Training FLOPs per token of one MoE layer, experts plus gating (the counting of
    train_flops_per_token, restricted to the layer; `python -m moe_impl bench` uses it):

        FLOPs = 2 · (1 + 2) · (num_active_experts · expert weights + 2·d·num_gate_outputs)

    Each active expert applies all its weights once (expert_params: 2·d·h for one hidden layer);
    the gate applies W_g and W_noise, 2·d weights per output, where num_gate_outputs is n (flat),
    a + k_primary·b (hierarchical: the primary gate plus the selected groups' secondary gates, as
    gate_ops counts them) or 0 (no gate: the dense FFN baseline, one expert of k·h units).
    With active_experts(cfg) and those gate outputs it equals 6 · (expert_ops_per_timestep(cfg) +
    gate_ops(cfg)).
    """
    d, h = d_model, d_hidden
    expert_weights = d * h + (expert_hidden_layers - 1) * h * h + h * d
    forward = num_active_experts * expert_weights + 2 * d * num_gate_outputs
    return FLOPS_PER_MULTIPLY_ADD * (1 + BACKWARD_TO_FORWARD) * forward
