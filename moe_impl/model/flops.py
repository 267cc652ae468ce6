"""Analytic parameter, ops and FLOP counts of the paper's LSTM / MoE language models.

Shazeer et al. 2017, Sec. 5.1 (ops/timestep, TFLOPS/GPU), App. C and D (model shapes); the counting
formulas are those of paper.md §4.3, which reproduce Tables 7 and 8. Plain Python integers: no torch
and no I/O, so analysis code can import it anywhere. The paper's models live in presets.py.

Not counted anywhere (the paper's numbers reproduce without them): biases, elementwise work
(LSTM cell nonlinearities, ReLU, sigmoid, the gates' softmax and noise, residual adds) and the
embedding lookup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

MoEKind = Literal["none", "flat", "hierarchical", "dense"]
MOE_KINDS: tuple[str, ...] = ("none", "flat", "hierarchical", "dense")

FLOPS_PER_MULTIPLY_ADD = 2
BACKWARD_TO_FORWARD = 2  # backward of a matmul = two matmuls of the forward's size

# Fields that only some MoE kinds use; every other kind must leave them at their default, so a
# setting is never silently ignored (style.md §2.12).
_KIND_FIELDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "dense": frozenset({"num_experts", "d_hidden", "expert_hidden_layers"}),
    "flat": frozenset({"num_experts", "d_hidden", "expert_hidden_layers", "k"}),
    "hierarchical": frozenset(
        {"num_experts", "d_hidden", "expert_hidden_layers"}
        | {"num_groups", "group_size", "k_primary", "k_secondary"}
    ),
}
_OPTIONAL_FIELDS = frozenset().union(*_KIND_FIELDS.values())


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A word-level LM of the paper: embedding -> LSTMs (with the MoE between them) -> softmax.

    `lstm_layers` holds one `(units, projection or None)` entry per LSTM layer (App. C: two layers
    around the MoE; the baselines use 1 to 4). Residual connections (App. C.1) keep every layer's
    output at `d_model`, so every LSTM's input dim is `d_model`. The input embedding and the output
    softmax are separate (untied) `vocab_size x d_model` matrices (paper.md §1.7).

    `moe` is one of:
      'none'          no MoE (4xLSTM-512, LSTM-2048-512, 2xLSTM-8192-1024, ...);
      'dense'         one always-active expert, no gate (MoE-1-Wide, MoE-1-Deep; num_experts=1);
      'flat'          noisy top-k over `num_experts` experts (Sec. 2.1; the paper uses k=4);
      'hierarchical'  `num_groups` (a) x `group_size` (b) experts, top-`k_primary` groups then
                      top-`k_secondary` experts in each (App. B; the paper uses 2+2).
    Each expert is d_model -> d_hidden (ReLU, `expert_hidden_layers` times) -> d_model, no biases.

    `softmax_samples` is the number of sampled classes of the training softmax (importance
    sampling, App. C.1); None or 0 means the full softmax. It only affects `train_flops_per_token`.
    """

    name: str
    vocab_size: int
    d_model: int
    lstm_layers: tuple[tuple[int, int | None], ...]
    softmax_samples: int | None
    moe: MoEKind = "none"
    num_experts: int = 0
    d_hidden: int = 0
    expert_hidden_layers: int = 1
    k: int | None = None
    num_groups: int | None = None
    group_size: int | None = None
    k_primary: int | None = None
    k_secondary: int | None = None

    def __post_init__(self) -> None:
        _check_positive("vocab_size", self.vocab_size)
        _check_positive("d_model", self.d_model)
        for i, (units, projection) in enumerate(self.lstm_layers):
            _check_positive(f"lstm_layers[{i}].units", units)
            out = units if projection is None else projection
            if out != self.d_model:
                raise ValueError(
                    f"lstm_layers[{i}] must output d_model={self.d_model} (residual connections), "
                    f"got {(units, projection)} which outputs {out}"
                )
        s = self.softmax_samples
        if s is not None and not 0 <= s < self.vocab_size:
            raise ValueError(
                f"softmax_samples must be in [0, vocab_size={self.vocab_size}), got {s}"
            )
        if self.moe not in MOE_KINDS:
            raise ValueError(f"moe must be one of {MOE_KINDS}, got {self.moe!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field in sorted(_OPTIONAL_FIELDS - _KIND_FIELDS[self.moe]):
            if getattr(self, field) != defaults[field]:
                raise ValueError(
                    f"{field} does not apply to moe={self.moe!r}; got {field}={getattr(self, field)}"
                )
        if self.moe != "none":
            _check_positive("d_hidden", self.d_hidden)
            _check_positive("expert_hidden_layers", self.expert_hidden_layers)
        if self.moe == "dense" and self.num_experts != 1:
            raise ValueError(f"num_experts must be 1 for moe='dense', got {self.num_experts}")
        if self.moe == "flat":
            _check_positive("num_experts", self.num_experts)
            _check_k("k", self.k, self.num_experts)
        if self.moe == "hierarchical":
            _check_positive("num_groups", self.num_groups)
            _check_positive("group_size", self.group_size)
            if self.num_groups * self.group_size != self.num_experts:
                raise ValueError(
                    f"num_groups x group_size must equal num_experts={self.num_experts}, "
                    f"got {self.num_groups} x {self.group_size}"
                )
            _check_k("k_primary", self.k_primary, self.num_groups)
            _check_k("k_secondary", self.k_secondary, self.group_size)


def _check_positive(field: str, value: int | None) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def _check_k(field: str, value: int | None, n: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= n:
        raise ValueError(f"{field} must be in [1, {n}], got {value!r}")


def lstm_params(d_in: int, units: int, projection: int | None) -> int:
    """Weights of one LSTM layer (paper.md §4.3): 4·n·(i+n), or 4·n·(i+p) + n·p with projection p.

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
        return 2 * d * cfg.num_groups + cfg.num_groups * 2 * d * cfg.group_size
    return 0


def gate_ops(cfg: ModelConfig) -> int:
    """Gating multiply-adds per timestep: all of W_g and W_noise are applied to every token.

    Hierarchical: the primary gate plus only the k_primary selected groups' secondary gates,
    2·d·a + k_primary·2·d·b (secondary gates run where the token is dispatched, App. B).
    """
    d = cfg.d_model
    if cfg.moe == "hierarchical":
        return 2 * d * cfg.num_groups + cfg.k_primary * 2 * d * cfg.group_size
    return gate_params(cfg)


def active_experts(cfg: ModelConfig) -> int:
    """Experts evaluated per token: k (flat), k_primary·k_secondary (hierarchical), 1 (dense)."""
    if cfg.moe == "flat":
        return cfg.k
    if cfg.moe == "hierarchical":
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
