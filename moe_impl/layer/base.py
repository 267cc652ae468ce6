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

    def compile_routing(self, **compile_kwargs: Any) -> Self:
        """Run the gates' noise, top-k, softmax and load estimator and the experts' combine through
        `torch.compile(**compile_kwargs)` (fullgraph=True unless given), the matmuls and the
        dispatch eager (moe_impl/layer/compiled.py); equal to the eager path within float32
        rounding. Compilation happens at the first forward. Returns self."""
        from moe_impl.layer.compiled import compile_routing

        compile_routing(self, **compile_kwargs)
        return self

    def eager_routing(self) -> Self:
        """Undo `compile_routing`: the eager gates and combine again. Returns self."""
        from moe_impl.layer.compiled import set_routing

        set_routing(self, None)
        return self

    @property
    def routing_compiled(self) -> bool:
        """Whether `compile_routing` is in effect."""
        return any(getattr(m, "compiled", None) is not None for m in self.modules())

    def extra_repr(self) -> str:
        return self.config.describe()
