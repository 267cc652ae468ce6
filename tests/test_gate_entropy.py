"""The layers' gate entropy (RoutingStats.gate_entropy and the hierarchical levels) against a
per-token loop over the loop reference's gates, closed forms, and the chain rule the
expert-parallel hierarchical layer uses."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import randomise_gates
from loop_reference import gate_one

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer.flat import entropy_sums
from moe_impl.parallel.hierarchical import split_entropy_sums

SEED = 99


def entropy(gates: torch.Tensor) -> float:
    gates = gates.detach()
    return float(-(gates * gates.log()).sum())


def inputs(b: int, d: int) -> torch.Tensor:
    return torch.randn((b, d), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


@pytest.mark.parametrize(("n", "k", "train"), [(6, 2, True), (8, 3, True), (5, 4, False)])
def test_flat_entropy_is_the_mean_over_tokens_of_each_tokens_gate_entropy(n, k, train):
    b, d = 11, 4
    layer = MoE(d, 5, n, k).double().train(train)
    randomise_gates(layer)
    x = inputs(b, d)
    out = layer(x, generator=torch.Generator().manual_seed(SEED + 1))
    eps = torch.randn((b, n), generator=torch.Generator().manual_seed(SEED + 1), dtype=x.dtype)
    want = [
        entropy(
            gate_one(x[i], layer.gate.w_gate, layer.gate.w_noise, k, eps[i] if train else None)[1]
        )
        for i in range(b)
    ]
    assert float(out.stats.gate_entropy) == pytest.approx(sum(want) / b, rel=1e-12)
    assert out.stats.primary_gate_entropy is None and out.stats.secondary_gate_entropy is None
    assert out.stats.entropy_sums.tolist()[1:] == [b]  # (Σ entropy, tokens): one level


@pytest.mark.parametrize(("a", "s", "k1", "k2"), [(4, 3, 2, 2), (5, 4, 1, 3), (3, 2, 3, 2)])
def test_hierarchical_entropy_per_level_against_the_loop(a, s, k1, k2):
    b, d = 9, 3
    layer = HierarchicalMoE(d, 4, a, s, k1, k2).double().train(True)
    randomise_gates(layer)
    x = inputs(b, d)
    out = layer(x, generator=torch.Generator().manual_seed(SEED + 1))
    g = torch.Generator().manual_seed(SEED + 1)  # the layer's order: randn(B, a), randn(B·k1, b)
    eps1 = torch.randn((b, a), generator=g, dtype=x.dtype) if a > 1 else None
    eps2 = torch.randn((b * k1, s), generator=g, dtype=x.dtype)
    p, q = layer.primary_gate, layer.secondary_gate
    whole, primary, secondary = [], [], []
    for t in range(b):
        groups, g1, _ = gate_one(x[t], p.w_gate, p.w_noise, k1, None if eps1 is None else eps1[t])
        primary.append(entropy(g1))
        products = []
        for j, (i, gi) in enumerate(zip(groups, g1, strict=True)):
            _, g2, _ = gate_one(x[t], q.w_gate[i], q.w_noise[i], k2, eps2[t * k1 + j])
            secondary.append(entropy(g2))
            products.append(gi * g2)
        whole.append(entropy(torch.cat(products)))
    stats = out.stats
    assert float(stats.gate_entropy) == pytest.approx(sum(whole) / b, rel=1e-12)
    assert float(stats.primary_gate_entropy) == pytest.approx(sum(primary) / b, rel=1e-12)
    assert float(stats.secondary_gate_entropy) == pytest.approx(
        sum(secondary) / (b * k1), rel=1e-12
    )


def test_closed_forms_k1_is_zero_and_equal_logits_are_ln_k():
    x = inputs(7, 4)
    one = MoE(4, 5, 6, k=1).double().eval()
    randomise_gates(one)
    assert float(one(x).stats.gate_entropy) == 0.0
    uniform = MoE(4, 5, 6, k=3).double().eval()  # zero gate weights: every logit equal
    assert float(uniform(x).stats.gate_entropy) == pytest.approx(math.log(3), rel=1e-12)
    hier = HierarchicalMoE(4, 5, 3, 4, 2, 2).double().eval()
    stats = hier(x).stats
    assert float(stats.primary_gate_entropy) == pytest.approx(math.log(2), rel=1e-12)
    assert float(stats.secondary_gate_entropy) == pytest.approx(math.log(2), rel=1e-12)
    assert float(stats.gate_entropy) == pytest.approx(math.log(4), rel=1e-12)


def test_the_chain_rule_split_equals_the_whole_gates_sums():
    """What each rank of DistributedHierarchicalMoE sums (its tokens' primary gates, the pairs it
    received) gives, added over a split of the pairs, the single-process layer's sums."""
    g = torch.Generator().manual_seed(5)
    b, k1, k2 = 6, 2, 3
    primary = torch.softmax(torch.randn((b, k1), generator=g, dtype=torch.float64), -1)
    secondary = torch.softmax(torch.randn((b * k1, k2), generator=g, dtype=torch.float64), -1)
    whole = (primary.reshape(-1, 1) * secondary).reshape(b, k1 * k2)
    want = entropy_sums(whole, primary, secondary)
    gate_M = primary.reshape(-1)
    half = b * k1 // 2  # the pairs split over two "ranks", the tokens all on the first
    got = split_entropy_sums(primary, gate_M[:half], secondary[:half]) + split_entropy_sums(
        primary[:0], gate_M[half:], secondary[half:]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
