"""The routing-flip meter: how many of a layer's top-k choices (paper Eq. 3-5; both levels of
App. B) change when its gate matmuls run at another precision than float32 (gate_precision.py).

A token's choices are the set of experts it is sent to: k of them in a flat layer, k_primary ·
k_secondary in a hierarchical one (a secondary choice in another group is another expert). A
flip is an expert in the float32 set that the other precision's set lacks; the share is the flips
over all choices. Routing is measured without noise (as in evaluation), whatever the layer's mode,
and nothing runs but the gates.

Shape suffixes: B = tokens, D = d_model, K = choices per token, P = (token, group) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moe_impl.layer.dispatch import make_plan
from moe_impl.layer.flat import MoE, flatten_input
from moe_impl.layer.hierarchical import HierarchicalMoE, expert_index


class FlipCount(NamedTuple):
    """Flipped choices out of all choices; counts of several batches add up (`+`)."""

    flipped: int  # (token, expert) choices of float32 that the other precision does not make
    choices: int  # all (token, expert) choices: tokens x experts per token

    @property
    def share(self) -> float:
        """flipped / choices (NaN without choices)."""
        return self.flipped / self.choices if self.choices else float("nan")

    def __add__(self, other: object) -> FlipCount:
        if not isinstance(other, FlipCount):
            return NotImplemented
        return FlipCount(self.flipped + other.flipped, self.choices + other.choices)


@torch.no_grad()
def routing_choices(layer: MoE | HierarchicalMoE, x: Tensor, precision: str) -> Tensor:
    """(B, K) the experts each token of x (..., d_model) is sent to, without noise, the gate
    matmuls at `precision`; a hierarchical layer's as ids group · group_size + j."""
    x_BD = flatten_input(x, layer.config.d_model)
    if isinstance(layer, MoE):
        clean_BE, _ = layer.gate.logits(x_BD, precision)
        return layer.gate.select(clean_BE, None).top_idx_BK
    if not isinstance(layer, HierarchicalMoE):
        raise ValueError(
            f"the flip meter measures a MoE or HierarchicalMoE, got {type(layer).__name__}"
        )
    cfg = layer.config
    assert cfg.num_groups is not None and cfg.group_size is not None  # set when built
    num_tokens, k1 = x_BD.shape[0], layer.primary_gate.k
    clean_BG, _ = layer.primary_gate.logits(x_BD, precision)
    group_P = layer.primary_gate.select(clean_BG, None).top_idx_BK.reshape(-1)
    token_P = torch.arange(num_tokens, device=x_BD.device).repeat_interleave(k1)
    group_plan = make_plan(group_P, token_P, cfg.num_groups)
    clean_PS, _ = layer.secondary_gate.logits(x_BD, group_plan, k1, precision)
    secondary = layer.secondary_gate.select(clean_PS, None)
    return expert_index(group_P, cfg.group_size, secondary.top_idx_BK).view(num_tokens, -1)


def count_flips(reference_BK: Tensor, other_BK: Tensor) -> FlipCount:
    """Choices in a row of `reference_BK` that are not in the same row of `other_BK` (each row a
    set of distinct expert ids, in any order)."""
    if reference_BK.shape != other_BK.shape:
        raise ValueError(
            f"the two routings must have the same shape, got {tuple(reference_BK.shape)} and "
            f"{tuple(other_BK.shape)}"
        )
    kept_BK = (reference_BK[:, :, None] == other_BK[:, None, :]).any(-1)
    return FlipCount(int((~kept_BK).sum()), reference_BK.numel())


def routing_flips(layer: MoE | HierarchicalMoE, x: Tensor, precision: str) -> FlipCount:
    """The flips of x's routing at `precision` against float32 (module docstring)."""
    return count_flips(routing_choices(layer, x, "float32"), routing_choices(layer, x, precision))
