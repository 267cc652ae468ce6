"""The routing-flip meter (moe_impl/layer/routing_flips.py) on gates built so that bf16 rounding
flips a known set of choices: near-ties that the rounding reverses, beside clear winners."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer.routing_flips import FlipCount, count_flips, routing_choices, routing_flips

# Three features, two outputs. Output 1's weight 1 + 2^-9 rounds to 1 in bf16; output 0 reads
# x1 + x2. A "near" token (1, 1 + 2^-10, 2^-12): float32 logits 1 + 2^-9 (output 1) > 1 + 2^-10 +
# 2^-12 (output 0); in bf16 x1 rounds to 1 and the logits are 1 < 1 + 2^-12: output 0 wins. A
# "clear" token (1, 0.5, 0): output 1 wins at either precision.
W_NEAR_TIE = torch.tensor([[0.0, 1 + 2**-9], [1.0, 0.0], [1.0, 0.0]])
NEAR = [1.0, 1 + 2**-10, 2**-12]
CLEAR = [1.0, 0.5, 0.0]
# a gate whose output 0 wins by far for the tokens above (positive features)
W_CLEAR = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])


def _set_gates(pairs) -> None:
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)


def test_count_flips_counts_choices_missing_from_the_other_set_in_any_order():
    reference = torch.tensor([[1, 2], [3, 4], [5, 6]])
    other = torch.tensor([[2, 1], [3, 7], [8, 9]])
    assert count_flips(reference, other) == FlipCount(3, 6)
    assert count_flips(reference, reference) == FlipCount(0, 6)
    assert (FlipCount(3, 6) + FlipCount(1, 4)).share == pytest.approx(0.4)
    with pytest.raises(ValueError, match="same shape"):
        count_flips(reference, other[:2])


def test_a_flat_layer_flips_exactly_the_near_tie_tokens_in_bf16():
    layer = MoE(3, 4, 2, k=1)
    _set_gates([(layer.gate.w_gate, W_NEAR_TIE)])
    x = torch.tensor([NEAR] * 3 + [CLEAR] * 5)
    assert routing_choices(layer, x, "float32").flatten().tolist() == [1] * 8
    assert routing_choices(layer, x, "bf16").flatten().tolist() == [0] * 3 + [1] * 5
    assert routing_flips(layer, x, "bf16") == FlipCount(3, 8)
    assert routing_flips(layer, x, "tf32") == FlipCount(0, 8)  # float32 on a CPU
    assert routing_flips(layer, x, "float32") == FlipCount(0, 8)


def test_a_hierarchical_layer_counts_flips_at_either_level_as_final_experts():
    """2 groups of 2, k = 1 + 1. Token kinds: a near tie in the primary gate (its group, hence its
    expert, flips), a near tie in group 1's gate (its expert within the group flips), clear."""
    layer = HierarchicalMoE(3, 4, 2, 2, k_primary=1, k_secondary=1)
    _set_gates(
        [
            (layer.primary_gate.w_gate, W_NEAR_TIE),
            (layer.secondary_gate.w_gate, torch.stack([W_CLEAR, W_NEAR_TIE])),
        ]
    )
    # primary: NEAR -> group 1 in float32, group 0 in bf16; CLEAR -> group 1 always; in group 1
    # NEAR flips expert 1 -> 0, CLEAR keeps expert 1; in group 0 expert 0 always wins
    x = torch.tensor([NEAR] * 2 + [CLEAR] * 6)
    assert routing_choices(layer, x, "float32").flatten().tolist() == [3] * 8
    assert routing_choices(layer, x, "bf16").flatten().tolist() == [0] * 2 + [3] * 6
    assert routing_flips(layer, x, "bf16") == FlipCount(2, 8)


def test_a_hierarchical_secondary_flip_alone_is_counted():
    layer = HierarchicalMoE(3, 4, 2, 2, k_primary=1, k_secondary=1)
    # the primary gate sends every token to group 1 (output 1 reads x0 only)
    primary = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    _set_gates(
        [
            (layer.primary_gate.w_gate, primary),
            (layer.secondary_gate.w_gate, torch.stack([W_CLEAR, W_NEAR_TIE])),
        ]
    )
    x = torch.tensor([NEAR] * 3 + [CLEAR])
    assert routing_flips(layer, x, "bf16") == FlipCount(3, 4)


@pytest.mark.parametrize("training", [False, True])
def test_the_meter_routes_without_noise_in_either_mode(training):
    layer = MoE(8, 16, 16, k=4)
    randomise_gates(layer)
    with torch.no_grad():
        layer.gate.w_noise.fill_(3.0)  # large noise, were it drawn
    layer.train(training)
    x = torch.randn(50, 8)
    expected = (x @ layer.gate.w_gate.detach()).topk(4).indices
    assert torch.equal(routing_choices(layer, x, "float32"), expected)
    assert routing_flips(layer, x, "float32") == FlipCount(0, 200)
