"""What a language model of the paper is: `ModelConfig`, shared by the network (lm.py), the
accounting (flops.py) and the presets (presets.py). Plain Python: no torch, no I/O.

A config is validated where it is built (`__post_init__`); errors name the field and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from moe_impl.layer.config import FLAT_FIELDS, HIERARCHICAL_FIELDS, LayerOptions, MoEConfig

# Dropout between the layers (App. C.1 used 0.1-0.4 over 10 epochs of LM1B); the LM's default and
# the run config's (moe_impl/train/config.py), one pass over an endless stream needs none
DEFAULT_DROPOUT = 0.0

MoEKind = Literal["none", "flat", "hierarchical", "dense"]
MOE_KINDS: tuple[str, ...] = ("none", "flat", "hierarchical", "dense")

# Fields that only some MoE kinds use; every other kind must leave them at their default, so a
# setting is never silently ignored.
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
    softmax are separate (untied) `vocab_size x d_model` matrices (App. C.1: the total parameter counts imply it).

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
            assert self.num_groups is not None and self.group_size is not None  # checked above
            if self.num_groups * self.group_size != self.num_experts:
                raise ValueError(
                    f"num_groups x group_size must equal num_experts={self.num_experts}, "
                    f"got {self.num_groups} x {self.group_size}"
                )
            _check_k("k_primary", self.k_primary, self.num_groups)
            _check_k("k_secondary", self.k_secondary, self.group_size)

    def layer_config(
        self,
        *,
        noisy_gating: bool = MoEConfig.noisy_gating,
        w_importance: float = MoEConfig.w_importance,
        w_load: float = MoEConfig.w_load,
        sparse_grad: bool | None = None,
    ) -> MoEConfig | None:
        """The MoE layer's config (its shape from this model, how it trains from the arguments);
        None for the models without a gated layer ('none', 'dense')."""
        options: LayerOptions = dict(
            noisy_gating=noisy_gating,
            w_importance=w_importance,
            w_load=w_load,
            sparse_grad=sparse_grad,
        )
        if self.moe not in ("flat", "hierarchical"):
            return None
        names = FLAT_FIELDS if self.moe == "flat" else HIERARCHICAL_FIELDS
        layout = {name: getattr(self, name) for name in names}
        return MoEConfig(d_model=self.d_model, d_hidden=self.d_hidden, **layout, **options)


def _check_positive(field: str, value: int | None) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def _check_k(field: str, value: int | None, n: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= n:
        raise ValueError(f"{field} must be in [1, {n}], got {value!r}")
