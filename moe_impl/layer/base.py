"""What the four MoE layer classes share: one `MoEConfig`, checked against the class, kept as
`layer.config` and shown by `repr` (arXiv 1701.06538, §2-§4)."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from torch import nn

from moe_impl.layer.config import MoEConfig


class MoELayer(nn.Module):
    """Base of MoE, HierarchicalMoE, DistributedMoE and DistributedHierarchicalMoE.

    A subclass sets HIERARCHICAL and DROPLESS, which say which configs it can take, and builds its
    gates and experts from `self.config` after `super().__init__(config)`.
    """

    HIERARCHICAL: ClassVar[bool]
    DROPLESS: ClassVar[bool]

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a MoEConfig, got {type(config).__name__}")
        name = type(self).__name__
        config.check_layer(name, hierarchical=self.HIERARCHICAL, dropless=self.DROPLESS)
        self.config = config

    @classmethod
    def from_config(cls, config: MoEConfig, **extra: Any) -> Self:
        """`cls(config, **extra)`; `extra`: the expert-parallel layers' `group` and
        `replicate_noise`."""
        return cls(config, **extra)

    def extra_repr(self) -> str:
        return self.config.describe()
