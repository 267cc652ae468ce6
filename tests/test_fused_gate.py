"""The fused noisy top-k gate with its load estimator (moe_impl/layer/fused_gate.py) against the
same maths composed from torch ops (gating.noisy_top_k(fused=False)): equal values, gradients to
float32 rounding, and gradcheck in float64."""

from __future__ import annotations

import pytest
import torch

from moe_impl.layer.fused_gate import noisy_top_k_with_load
from moe_impl.layer.gating import noisy_top_k


def _inputs(rows, experts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(rows, experts, generator=g, dtype=dtype).requires_grad_()
    noise = torch.randn(rows, experts, generator=g, dtype=dtype).requires_grad_()
    normal = torch.randn(rows, experts, generator=g, dtype=dtype)
    return clean, noise, normal


@pytest.mark.parametrize(
    ("rows", "experts", "k"), [(64, 4, 1), (64, 8, 2), (128, 32, 4), (7, 5, 4)]
)
def test_fused_equals_the_composition(rows, experts, k):
    clean, noise, normal = _inputs(rows, experts)
    fused = noisy_top_k(clean, noise, k, normal_BE=normal)
    ref = noisy_top_k(clean, noise, k, normal_BE=normal, fused=False)
    assert torch.equal(fused.top_idx_BK, ref.top_idx_BK)
    assert torch.equal(fused.top_gates_BK, ref.top_gates_BK)
    torch.testing.assert_close(fused.prob_in_top_k_BE, ref.prob_in_top_k_BE, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    w_gates, w_prob = torch.randn(rows, k, generator=g), torch.randn(rows, experts, generator=g)
    grads = []
    for out in (fused, ref):
        loss = (out.top_gates_BK * w_gates).sum() + (out.prob_in_top_k_BE * w_prob).sum()
        grads.append(torch.autograd.grad(loss, (clean, noise)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_gradcheck_float64():
    clean, noise, normal = _inputs(6, 5, torch.float64, seed=3)
    fn = lambda c, n: noisy_top_k_with_load(c, n, normal, 2, 1e-2)[1:]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (clean, noise))


def test_fused_keeps_leading_dims():
    clean, noise, normal = _inputs(12, 6)
    out = noisy_top_k(clean.view(3, 4, 6), noise.view(3, 4, 6), 2, normal_BE=normal.view(3, 4, 6))
    assert out.top_idx_BK.shape == (3, 4, 2) and out.prob_in_top_k_BE.shape == (3, 4, 6)


@pytest.mark.parametrize("use", ["gates", "prob"])
def test_fused_backward_with_one_output_unused(use):
    clean, noise, normal = _inputs(16, 8)
    grads = []
    for fused in (True, False):
        out = noisy_top_k(clean, noise, 2, normal_BE=normal, fused=fused)
        loss = out.top_gates_BK.square().sum() if use == "gates" else out.prob_in_top_k_BE.sum()
        grads.append(torch.autograd.grad(loss, (clean, noise)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
