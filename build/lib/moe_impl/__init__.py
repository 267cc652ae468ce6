"""Reproduction harness for "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer" (Shazeer et al., ICLR 2017)."""

from moe_impl import balancing
from moe_impl.hierarchical import HierarchicalMoE
from moe_impl.layer import MoE, MoEOutput, RoutingStats

__all__ = ["HierarchicalMoE", "MoE", "MoEOutput", "RoutingStats", "balancing"]
