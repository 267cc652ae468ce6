"""What a language model of the paper is: `ModelConfig`, shared by the network (lm.py), the
accounting (flops.py) and the presets (presets.py). Plain Python: no torch, no I/O.

A ModelConfig holds the layer between its first two LSTMs as a config of its own: a `MoEConfig`
(layer/config.py, the one definition of a gated layer and of its defaults), a `DenseConfig` (the
compute-matched baselines' always-active expert) or None (the LSTM baselines). Run configs,
summary.json and the presets write a model in one flat form (`moe: flat`, `num_experts: 32`, ...:
FLAT_KEYS); `ModelConfig.build(**flat)` reads it and `cfg.flat()` writes it.

A config is validated where it is built; errors name the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from moe_impl.layer.config import OPTIONS, LayerOptions, MoEConfig, check_positive_int

# Dropout between the layers (App. C.1 used 0.1-0.4 over 10 epochs of LM1B); the LM's default and
# the run config's (moe_impl/train/config.py), one pass over an endless stream needs none
DEFAULT_DROPOUT = 0.0

MoEKind = Literal["none", "flat", "hierarchical", "dense"]
MOE_KINDS: tuple[str, ...] = ("none", "flat", "hierarchical", "dense")

# The flat form of a model's layer, in the order summary.json writes it, with the values a model
# without that part takes (0 experts and d_hidden 0 without a layer, 1 expert hidden layer).
LAYOUT_DEFAULTS: dict[str, Any] = {
    "moe": "none",
    "num_experts": 0,
    "d_hidden": 0,
    "expert_hidden_layers": 1,
    "k": None,
    "num_groups": None,
    "group_size": None,
    "k_primary": None,
    "k_secondary": None,
}
FLAT_KEYS = ("name", "vocab_size", "d_model", "lstm_layers", "softmax_samples", *LAYOUT_DEFAULTS)

# The layout keys each kind uses; every other kind must leave them at LAYOUT_DEFAULTS, so a setting
# is never silently ignored. An expert of the gated layers has one hidden layer (Sec. 2.1; App. C).
_KIND_KEYS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "dense": frozenset({"num_experts", "d_hidden", "expert_hidden_layers"}),
    "flat": frozenset({"num_experts", "d_hidden", "k"}),
    "hierarchical": frozenset(
        {"num_experts", "d_hidden", "num_groups", "group_size", "k_primary", "k_secondary"}
    ),
}


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    """One always-active expert, no gate (MoE-1-Wide, MoE-1-Deep; App. C.1): d_model -> d_hidden
    (ReLU, `hidden_layers` times) -> d_model, no biases."""

    d_hidden: int
    hidden_layers: int = 1

    def __post_init__(self) -> None:
        check_positive_int(d_hidden=self.d_hidden)
        check_positive_int(expert_hidden_layers=self.hidden_layers)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A word-level LM of the paper: embedding -> LSTMs (with the MoE between them) -> softmax.

    `lstm_layers` holds one `(units, projection or None)` entry per LSTM layer (App. C: two layers
    around the MoE; the baselines use 1 to 4). Residual connections (App. C.1) keep every layer's
    output at `d_model`, so every LSTM's input dim is `d_model`. The input embedding and the output
    softmax are separate (untied) `vocab_size x d_model` matrices (App. C.1: the total parameter
    counts imply it).

    `layer` sits after the first LSTM: a `MoEConfig` (flat, Sec. 2.1, the paper's k = 4; or
    hierarchical, App. B, 2 + 2), a `DenseConfig` (MoE-1-Wide, MoE-1-Deep) or None (no MoE:
    4xLSTM-512, LSTM-2048-512, 2xLSTM-8192-1024, ...); `moe` names which ('flat', 'hierarchical',
    'dense', 'none'). `dropout` applies between the layers.

    `softmax_samples` is the number of sampled classes of the training softmax (importance
    sampling, App. C.1); None or 0 means the full softmax. It only affects `train_flops_per_token`.
    """

    name: str
    vocab_size: int
    d_model: int
    lstm_layers: tuple[tuple[int, int | None], ...]
    softmax_samples: int | None
    layer: MoEConfig | DenseConfig | None = None
    dropout: float = DEFAULT_DROPOUT

    def __post_init__(self) -> None:
        check_positive_int(vocab_size=self.vocab_size)
        check_positive_int(d_model=self.d_model)
        for i, (units, projection) in enumerate(self.lstm_layers):
            check_positive_int(**{f"lstm_layers[{i}].units": units})
            out = units if projection is None else projection
            if out != self.d_model:
                raise ValueError(
                    f"lstm_layers[{i}] must output d_model={self.d_model} (residual connections), "
                    f"got {(units, projection)} which outputs {out}"
                )
        s = self.softmax_samples
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise ValueError(f"softmax_samples must be an integer or None, got {s!r}")
        if s is not None and not 0 <= s < self.vocab_size:
            raise ValueError(
                f"softmax_samples must be in [0, vocab_size={self.vocab_size}), got {s}"
            )
        if not isinstance(self.layer, MoEConfig | DenseConfig | None):
            raise ValueError(
                f"layer must be a MoEConfig, a DenseConfig or None, got {self.layer!r}"
            )
        if isinstance(self.layer, MoEConfig) and self.layer.d_model != self.d_model:
            raise ValueError(
                f"the MoE layer's d_model={self.layer.d_model} must equal the model's "
                f"d_model={self.d_model}"
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def build(
        cls,
        *,
        name: str,
        vocab_size: int,
        d_model: int,
        lstm_layers: tuple[tuple[int, int | None], ...],
        softmax_samples: int | None,
        dropout: float = DEFAULT_DROPOUT,
        **layout_and_options: Any,
    ) -> ModelConfig:
        """The model of the flat form: FLAT_KEYS (those of the layout default to LAYOUT_DEFAULTS)
        and the gated layer's options (LayerOptions: noisy_gating, w_importance, ...; MoEConfig's
        defaults where not given, and not used by the models without a gate)."""
        layout = {k: layout_and_options.pop(k, v) for k, v in LAYOUT_DEFAULTS.items()}
        unknown = sorted(set(layout_and_options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown model field {unknown[0]}={layout_and_options[unknown[0]]!r}; valid: "
                + ", ".join((*FLAT_KEYS, "dropout", *OPTIONS))
            )
        options: LayerOptions = layout_and_options  # type: ignore[assignment]  # names checked
        layer = _layer(d_model, layout, options)
        return cls(
            name=name,
            vocab_size=vocab_size,
            d_model=d_model,
            lstm_layers=lstm_layers,
            softmax_samples=softmax_samples,
            layer=layer,
            dropout=dropout,
        )

    def flat(self) -> dict[str, Any]:
        """The flat form, FLAT_KEYS in order (what summary.json's "model" holds): the layout only,
        not how the model trains (dropout, the gate's options)."""
        return {k: getattr(self, k) for k in FLAT_KEYS}

    def replace(self, **changes: Any) -> ModelConfig:
        """A new, validated config: this one's flat form, dropout and gate options with `changes`
        (any of FLAT_KEYS, `dropout` and LayerOptions) laid over them."""
        options: dict[str, Any] = {"dropout": self.dropout}
        if isinstance(self.layer, MoEConfig):
            options |= {k: getattr(self.layer, k) for k in OPTIONS}
        return ModelConfig.build(**{**self.flat(), **options, **changes})

    @property
    def moe(self) -> MoEKind:
        """'none', 'dense', 'flat' or 'hierarchical': what `layer` is."""
        if isinstance(self.layer, MoEConfig):
            return "hierarchical" if self.layer.hierarchical else "flat"
        return "dense" if isinstance(self.layer, DenseConfig) else "none"

    @property
    def num_experts(self) -> int:
        """The experts of the layer: 0 without one, 1 for the dense layer."""
        if isinstance(self.layer, MoEConfig):
            assert self.layer.num_experts is not None  # set when built
            return self.layer.num_experts
        return 1 if isinstance(self.layer, DenseConfig) else 0

    @property
    def d_hidden(self) -> int:
        """An expert's hidden size (0 without a layer)."""
        return 0 if self.layer is None else self.layer.d_hidden

    @property
    def expert_hidden_layers(self) -> int:
        """An expert's hidden layers: the dense layer's `hidden_layers`, else 1."""
        return self.layer.hidden_layers if isinstance(self.layer, DenseConfig) else 1

    @property
    def k(self) -> int | None:
        """Experts per token of a flat layer (None otherwise)."""
        return self._gate_field("k")

    @property
    def num_groups(self) -> int | None:
        """Groups of a hierarchical layer (None otherwise)."""
        return self._gate_field("num_groups")

    @property
    def group_size(self) -> int | None:
        """Experts per group of a hierarchical layer (None otherwise)."""
        return self._gate_field("group_size")

    @property
    def k_primary(self) -> int | None:
        """Groups per token of a hierarchical layer (None otherwise)."""
        return self._gate_field("k_primary")

    @property
    def k_secondary(self) -> int | None:
        """Experts per chosen group of a hierarchical layer (None otherwise)."""
        return self._gate_field("k_secondary")

    def _gate_field(self, name: str) -> int | None:
        return getattr(self.layer, name) if isinstance(self.layer, MoEConfig) else None


def _layer(
    d_model: int, layout: dict[str, Any], options: LayerOptions
) -> MoEConfig | DenseConfig | None:
    """The layer of a flat layout: checks that the keys the kind does not use are at their defaults
    and that the hierarchical sizes multiply to num_experts, then builds it."""
    kind = layout["moe"]
    if kind not in MOE_KINDS:
        raise ValueError(f"moe must be one of {MOE_KINDS}, got {kind!r}")
    for key in sorted(LAYOUT_DEFAULTS.keys() - _KIND_KEYS[kind] - {"moe"}):
        if layout[key] != LAYOUT_DEFAULTS[key]:
            raise ValueError(f"{key} does not apply to moe={kind!r}; got {key}={layout[key]}")
    if kind in ("none", "dense"):
        # No gate: its options are checked, then have no effect, so that one set of overrides
        # (`model.w_importance=0`) can serve a sweep's MoE models and its baselines alike.
        MoEConfig(d_model=1, d_hidden=1, num_experts=1, k=1, **options)
    if kind == "none":
        return None
    if kind == "dense":
        if layout["num_experts"] != 1:
            raise ValueError(f"num_experts must be 1 for moe='dense', got {layout['num_experts']}")
        return DenseConfig(
            d_hidden=layout["d_hidden"], hidden_layers=layout["expert_hidden_layers"]
        )
    return _gated(d_model, kind, layout, options)


def _gated(d_model: int, kind: str, layout: dict[str, Any], options: LayerOptions) -> MoEConfig:
    check_positive_int(d_hidden=layout["d_hidden"])
    check_positive_int(num_experts=layout["num_experts"])
    if kind == "flat":
        return MoEConfig(
            d_model=d_model,
            d_hidden=layout["d_hidden"],
            num_experts=layout["num_experts"],
            k=layout["k"],
            **options,
        )
    a, b = layout["num_groups"], layout["group_size"]
    check_positive_int(num_groups=a)
    check_positive_int(group_size=b)
    if a * b != layout["num_experts"]:
        raise ValueError(
            f"num_groups x group_size must equal num_experts={layout['num_experts']}, got {a} x {b}"
        )
    return MoEConfig(
        d_model=d_model,
        d_hidden=layout["d_hidden"],
        num_groups=a,
        group_size=b,
        k_primary=layout["k_primary"],
        k_secondary=layout["k_secondary"],
        **options,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
