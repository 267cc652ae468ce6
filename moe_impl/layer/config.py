"""The hyper-parameters of one sparsely-gated MoE layer (arXiv 1701.06538, §2-§4, App. A-C),
validated in one place.

`MoEConfig` is shared by the four layer classes: `MoE` and `HierarchicalMoE` (this package) and
their expert-parallel twins `DistributedMoE` and `DistributedHierarchicalMoE` (moe_impl.parallel).
Every layer is built as `Layer(config)` (the expert-parallel ones `Layer(config, group=...)`) and
keeps it as `layer.config`; `MoE` and `HierarchicalMoE` also take the paper's arguments
(`MoE(d_model, d_hidden, num_experts, k)`), from which they build the config (`layer_config`),
which is where the arguments are checked. The defaults are MoEConfig's fields, nowhere else. No
torch here, so a config can be built and checked without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

# Above this many experts the expert gradients are sparse by default (ExpertBank docstring).
SPARSE_GRAD_MIN_EXPERTS = 4096
# Experts per token when not given: k = 4 in the flat models (App. C); 2 groups x 2 experts in every
# hierarchical model (App. B, C).
DEFAULT_K = 4
DEFAULT_K_PRIMARY = 2
DEFAULT_K_SECONDARY = 2

# the fields that give each layout its shape, beside d_model and d_hidden
FLAT_FIELDS = ("num_experts", "k")
HIERARCHICAL_FIELDS = ("num_groups", "group_size", "k_primary", "k_secondary")
# The precision of the gate logits' matmuls (gate_precision.py): float32 routes as the float64
# reference does; tf32 and bf16 run them on tensor cores.
GATE_PRECISIONS = ("float32", "tf32", "bf16")


def check_positive_int(**values: Any) -> None:
    """ValueError naming the argument unless each value is an int >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_k(k_name: str, k: Any, n_name: str, n: int) -> None:
    check_positive_int(**{k_name: k})
    if k > n:
        raise ValueError(f"{k_name}={k} must be <= {n_name}={n}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer: flat (Eq. 1) when `num_experts` is given, hierarchical (Eq. 12) when
    `num_groups` and `group_size` are.

    Fields left at None are filled in by the constructor: k = 4 (flat), k_primary = k_secondary = 2
    and num_experts = num_groups · group_size (hierarchical), so a built config always holds the
    layer's effective values. The fields of the other layout stay None. `sparse_grad=None` means
    "sparse from SPARSE_GRAD_MIN_EXPERTS experts on" (see `use_sparse_grad`). `gate_precision` is
    the precision of the gate logits' matmuls (layer/gate_precision.py; float32 by default). Every
    bad value raises a ValueError that names the field and the value.
    """

    d_model: int
    d_hidden: int
    # flat layer: E experts, k of them per token (Eq. 3-5)
    num_experts: int | None = None
    k: int | None = None
    # hierarchical layer (App. B): a groups of b experts; k_primary groups, then k_secondary experts
    # in each; num_experts is then a·b
    num_groups: int | None = None
    group_size: int | None = None
    k_primary: int | None = None
    k_secondary: int | None = None
    # options common to both layouts
    noisy_gating: bool = True  # the noise term of Eq. 4 (in training only)
    w_importance: float = 0.1  # Eq. 7, 0.1 in App. C.1
    w_load: float = 0.1  # Eq. 11, 0.1 in App. C.1
    capacity_factor: float | None = None  # not in the paper: None = dropless (the paper's layer)
    sparse_grad: bool | None = None  # sparse expert gradients; None = by the number of experts
    gate_precision: str = "float32"  # not in the paper: the gate matmuls' (GATE_PRECISIONS)

    def __post_init__(self) -> None:
        check_positive_int(d_model=self.d_model, d_hidden=self.d_hidden)
        if self.hierarchical:
            self._check_hierarchical()
        else:
            self._check_flat()
        for name in ("w_importance", "w_load"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}"
            )
        if not isinstance(self.noisy_gating, bool):
            raise ValueError(f"noisy_gating must be True or False, got {self.noisy_gating!r}")
        if self.sparse_grad is not None and not isinstance(self.sparse_grad, bool):
            raise ValueError(f"sparse_grad must be True, False or None, got {self.sparse_grad!r}")
        if self.gate_precision not in GATE_PRECISIONS:
            raise ValueError(
                f"gate_precision must be one of {', '.join(GATE_PRECISIONS)}, got "
                f"{self.gate_precision!r}"
            )

    def _check_flat(self) -> None:
        if self.num_experts is None:
            raise ValueError(
                "num_experts must be given (a flat layer), or num_groups and group_size (a "
                "hierarchical one), got num_experts=None"
            )
        for name in HIERARCHICAL_FIELDS[2:]:  # k_primary, k_secondary without the groups
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to a hierarchical layer only: "
                    "give num_groups and group_size, or leave it None"
                )
        check_positive_int(num_experts=self.num_experts)
        k = DEFAULT_K if self.k is None else self.k
        _check_k("k", k, "num_experts", self.num_experts)
        object.__setattr__(self, "k", k)  # frozen: filling in a default is construction

    def _check_hierarchical(self) -> None:
        if self.k is not None:
            raise ValueError(
                f"k={self.k!r} applies to a flat layer only: a hierarchical layer takes "
                "k_primary and k_secondary"
            )
        a, b = self.num_groups, self.group_size
        check_positive_int(num_groups=a, group_size=b)
        assert a is not None and b is not None  # for mypy: checked just above
        k_primary = DEFAULT_K_PRIMARY if self.k_primary is None else self.k_primary
        k_secondary = DEFAULT_K_SECONDARY if self.k_secondary is None else self.k_secondary
        _check_k("k_primary", k_primary, "num_groups", a)
        _check_k("k_secondary", k_secondary, "group_size", b)
        if self.num_experts is not None and self.num_experts != a * b:
            raise ValueError(
                f"num_experts={self.num_experts!r} must equal num_groups x group_size = "
                f"{a} x {b} = {a * b} (or be left None)"
            )
        for name, value in (
            ("k_primary", k_primary),
            ("k_secondary", k_secondary),
            ("num_experts", a * b),
        ):
            object.__setattr__(self, name, value)

    @property
    def hierarchical(self) -> bool:
        """Whether this is the two-level layer of App. B (num_groups or group_size given)."""
        return self.num_groups is not None or self.group_size is not None

    @property
    def experts_per_token(self) -> int:
        """k (flat) or k_primary · k_secondary (hierarchical): the slots of one token."""
        if self.hierarchical:
            assert self.k_primary is not None and self.k_secondary is not None  # set when built
            return self.k_primary * self.k_secondary
        assert self.k is not None  # set when built
        return self.k

    @property
    def use_sparse_grad(self) -> bool:
        """`sparse_grad`, with None resolved: sparse from SPARSE_GRAD_MIN_EXPERTS experts on."""
        if self.sparse_grad is None:
            assert self.num_experts is not None  # set when built
            return self.num_experts >= SPARSE_GRAD_MIN_EXPERTS
        return self.sparse_grad

    def layout_fields(self) -> dict[str, int]:
        """The fields that give the layer its shape: d_model, d_hidden and the layout's sizes."""
        names = HIERARCHICAL_FIELDS if self.hierarchical else FLAT_FIELDS
        return {name: getattr(self, name) for name in ("d_model", "d_hidden", *names)}

    def check_layer(self, layer: str, *, hierarchical: bool, dropless: bool) -> None:
        """ValueError when the layer class named `layer` cannot take this config: the other
        layout, or a capacity for a dropless one."""
        if hierarchical != self.hierarchical:
            want = "num_groups and group_size" if hierarchical else "num_experts"
            raise ValueError(f"{layer} needs a config with {want}, got {self!r}")
        if dropless and self.capacity_factor is not None:
            raise ValueError(
                f"{layer} is dropless: capacity_factor must be None, got {self.capacity_factor!r}"
            )

    def describe(self) -> str:
        """The layout fields and the loss weights, then every option that differs from its default
        (for a layer's extra_repr)."""
        parts = {**self.layout_fields(), "w_importance": self.w_importance, "w_load": self.w_load}
        for field in ("noisy_gating", "capacity_factor", "sparse_grad", "gate_precision"):
            value = getattr(self, field)
            if value != _DEFAULTS[field]:
                parts[field] = value
        return ", ".join(f"{name}={value}" for name, value in parts.items())


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoEConfig)}


class LayerOptions(TypedDict, total=False):
    """What `MoE(...)` and `HierarchicalMoE(...)` take beside the layout, as keywords: MoEConfig's
    fields of the same names, whose defaults apply where one is not given."""

    noisy_gating: bool
    w_importance: float
    w_load: float
    capacity_factor: float | None
    sparse_grad: bool | None
    gate_precision: str


OPTIONS = tuple(LayerOptions.__annotations__)


def layer_config(
    layer: str, first: int | MoEConfig, layout: dict[str, Any], options: Mapping[str, Any]
) -> MoEConfig:
    """The config of `layer(first, *layout, **options)`: `first` itself when it is a MoEConfig
    (nothing else may then be given), else MoEConfig(d_model=first, **layout, **options), the
    layout's None fields left to MoEConfig's defaults."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise ValueError(
            f"{layer} got an unknown option {unknown[0]}={options[unknown[0]]!r}; its options "
            f"are {', '.join(OPTIONS)}"
        )
    if not isinstance(first, MoEConfig):
        return MoEConfig(d_model=first, **layout, **options)
    given = {**{k: v for k, v in layout.items() if v is not None}, **options}
    if given:
        raise ValueError(
            f"{layer} takes a MoEConfig or the layer's arguments, not both: got a config and "
            + ", ".join(f"{k}={v!r}" for k, v in given.items())
        )
    return first
