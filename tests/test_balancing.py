"""cv_squared, the smooth load estimator P(x, i) and gradchecks of the auxiliary loss."""

from __future__ import annotations

import itertools

import pytest
import torch
from loop_reference import kth_excluding, phi
from torch.func import functional_call

from moe_impl import HierarchicalMoE, MoE, balancing


def test_cv_squared_closed_forms():
    assert balancing.cv_squared(torch.full((7,), 3.0)).item() == 0.0
    assert balancing.cv_squared(torch.zeros(0)).item() == 0.0
    # [0, 2]: mean 1, population variance 1 -> CV² = 1 / (1 + 1e-10)
    torch.testing.assert_close(balancing.cv_squared(torch.tensor([0.0, 2.0])), torch.tensor(1.0))
    v = torch.rand(5, 4, dtype=torch.float64)
    want = v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)
    torch.testing.assert_close(balancing.cv_squared(v), want)


def test_cv_squared_grows_as_routing_concentrates():
    values = [
        balancing.cv_squared(torch.tensor([10.0 - 3 * s, 10 + s, 10 + s, 10 + s])) for s in range(4)
    ]
    assert all(a < b for a, b in itertools.pairwise(values))


def _random_logits(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, generator=g, dtype=torch.float64)
    std = torch.rand(n, generator=g, dtype=torch.float64) + 0.3
    noisy = clean + torch.randn(n, generator=g, dtype=torch.float64) * std
    return clean, noisy, std


@pytest.mark.parametrize(("n", "k"), [(4, 1), (5, 2), (8, 3), (16, 4), (3, 2)])
def test_prob_in_top_k_equals_its_definition(n, k):
    clean, noisy, std = _random_logits(n, seed=n * 10 + k)
    got = balancing.prob_in_top_k(clean[None], noisy[None], std[None], k)[0]
    want = torch.stack([phi((clean[i] - kth_excluding(noisy, k, i)) / std[i]) for i in range(n)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("n", "k"), [(4, 1), (6, 2), (8, 3), (16, 4)])
def test_prob_in_top_k_monte_carlo(n, k):
    """Re-draw only expert i's noise, the others held fixed, and count how often i is in the top k."""
    clean, noisy, std = _random_logits(n, seed=n + k)
    prob = balancing.prob_in_top_k(clean[None], noisy[None], std[None], k)[0]
    draws = 200_000
    g = torch.Generator().manual_seed(99)
    for i in range(n):
        redrawn = noisy.expand(draws, n).clone()
        redrawn[:, i] = clean[i] + torch.randn(draws, generator=g, dtype=torch.float64) * std[i]
        in_top = (redrawn.topk(k, dim=1).indices == i).any(dim=1).double().mean()
        p = prob[i].item()
        tol = 5 * (p * (1 - p) / draws) ** 0.5 + 1e-4
        assert abs(in_top.item() - p) <= tol, (i, in_top.item(), p)


def test_prob_in_top_k_rejects_k_at_least_n():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="k"):
        balancing.prob_in_top_k(x, x, torch.ones(2, 4), 4)


def _aux_loss_of(layer: torch.nn.Module, names: list[str], x: torch.Tensor):
    def aux(*weights):
        out = functional_call(
            layer,
            dict(zip(names, weights, strict=True)),
            (x,),
            {"generator": torch.Generator().manual_seed(11)},
        )
        return out.aux_loss

    return aux


def _gate_params(layer, names):
    g = torch.Generator().manual_seed(2)
    params = dict(layer.named_parameters())
    return [
        (torch.randn(params[n].shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
        for n in names
    ]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradcheck_flat_aux_loss(k):
    layer = MoE(3, 4, 5, k, w_importance=0.5, w_load=0.7).double().train()
    names = ["gate.w_gate", "gate.w_noise"]
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(_aux_loss_of(layer, names, x), _gate_params(layer, names))


def test_gradcheck_hierarchical_aux_loss():
    layer = HierarchicalMoE(3, 4, 3, 4, w_importance=0.5, w_load=0.7).double().train()
    names = [
        "primary_gate.w_gate",
        "primary_gate.w_noise",
        "secondary_gate.w_gate",
        "secondary_gate.w_noise",
    ]
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(_aux_loss_of(layer, names, x), _gate_params(layer, names))


def test_load_loss_has_gradient_to_both_gates_with_k1():
    """With k = 1 the gate value is constant 1, so only the smooth load trains the gate (§1.3)."""
    layer = MoE(4, 4, 6, k=1).train()
    x = torch.randn(32, 4)
    out = layer(x, generator=torch.Generator().manual_seed(0))
    gw, gn = torch.autograd.grad(
        out.load_loss, [layer.gate.w_gate, layer.gate.w_noise], retain_graph=True
    )
    assert gw.abs().sum() > 0 and gn.abs().sum() > 0
    (gy,) = torch.autograd.grad(out.y.sum(), [layer.gate.w_gate], allow_unused=True)
    assert gy is None or gy.abs().sum() == 0
