"""Reproduction harness for "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer" (Shazeer et al., ICLR 2017, arXiv 1701.06538).

The layers are re-exported lazily, so `import moe_impl.model.flops` (or the config and presets)
does not load torch:

    from moe_impl import MoE, HierarchicalMoE, balancing
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "MoE": "moe_impl.layer.flat",
    "MoEOutput": "moe_impl.layer.flat",
    "RoutingStats": "moe_impl.layer.flat",
    "HierarchicalMoE": "moe_impl.layer.hierarchical",
    "MoEConfig": "moe_impl.layer.config",
}

__all__ = [*_EXPORTS, "balancing"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "balancing":
        return importlib.import_module("moe_impl.layer.balancing")
    raise AttributeError(f"module 'moe_impl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
