"""The vectorised MoE and HierarchicalMoE against the per-token loop reference (float64)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates
from loop_reference import flat_moe, hierarchical_moe

from moe_impl import HierarchicalMoE, MoE

SEED = 1234


def draw(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = torch.autograd.grad(loss, tensors, allow_unused=True)  # w_noise is unused without noise
    dense = [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors, strict=True)]
    return [g.to_dense() if g.is_sparse else g for g in dense]


def assert_matches_reference(out, reference, x, params) -> None:
    """Output, aux loss, token counts and the gradients of x and every parameter agree."""
    y_ref, aux_ref, counts_ref = reference
    torch.testing.assert_close(out.y, y_ref)
    torch.testing.assert_close(out.aux_loss, aux_ref)
    torch.testing.assert_close(out.stats.tokens_per_expert.double(), counts_ref)
    r = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    got = grads((out.y * r).sum() + out.aux_loss, [x, *params])
    want = grads((y_ref * r).sum() + aux_ref, [x, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# (tokens, d_model, d_hidden, num_experts, k, train, noisy, sparse_grad)
FLAT_CASES = [
    (12, 5, 7, 6, 2, True, True, False),
    (12, 5, 7, 6, 2, True, True, True),
    (9, 4, 3, 8, 3, True, True, False),
    (10, 4, 6, 5, 1, True, True, False),  # k = 1
    (10, 4, 6, 4, 4, True, True, False),  # k = n: every expert, load = true count
    (10, 4, 6, 6, 2, False, True, False),  # eval: no noise
    (10, 4, 6, 6, 2, True, False, True),  # noisy_gating=False in training
]


@pytest.mark.parametrize(("b", "d", "h", "n", "k", "train", "noisy", "sparse"), FLAT_CASES)
def test_flat_matches_loop_reference(b, d, h, n, k, train, noisy, sparse):
    layer = MoE(d, h, n, k, noisy_gating=noisy, w_importance=0.3, w_load=0.2, sparse_grad=sparse)
    layer = layer.double().train(train)
    randomise_gates(layer)
    (x,) = draw((b, d))
    x.requires_grad_(True)
    out = layer(x, generator=torch.Generator().manual_seed(SEED + 1))

    eps = None
    if train and noisy:  # the layer draws randn(B, n) from the generator
        eps = torch.randn((b, n), generator=torch.Generator().manual_seed(SEED + 1), dtype=x.dtype)
    params = [layer.gate.w_gate, layer.gate.w_noise, layer.experts.w_in, layer.experts.w_out]
    y_ref, aux_ref, counts_ref = flat_moe(x, *params, k, eps, 0.3, 0.2)

    assert_matches_reference(out, (y_ref, aux_ref, counts_ref), x, params)


# (tokens, d_model, d_hidden, groups, group_size, k1, k2, train, noisy, sparse_grad)
HIER_CASES = [
    (10, 4, 5, 4, 3, 2, 2, True, True, False),
    (10, 4, 5, 4, 3, 2, 2, True, True, True),
    (8, 3, 4, 5, 4, 1, 3, True, True, False),
    (8, 3, 4, 3, 2, 3, 2, True, True, False),  # k_primary = a and k_secondary = b
    (8, 3, 4, 4, 3, 2, 2, False, True, False),  # eval
    (8, 3, 4, 4, 3, 2, 1, True, False, False),  # noisy_gating=False
]


@pytest.mark.parametrize(("b", "d", "h", "a", "s", "k1", "k2", "train", "noisy", "sp"), HIER_CASES)
def test_hierarchical_matches_loop_reference(b, d, h, a, s, k1, k2, train, noisy, sp):
    layer = HierarchicalMoE(
        d, h, a, s, k1, k2, noisy_gating=noisy, w_importance=0.3, w_load=0.2, sparse_grad=sp
    )
    layer = layer.double().train(train)
    randomise_gates(layer)
    (x,) = draw((b, d))
    x.requires_grad_(True)
    out = layer(x, generator=torch.Generator().manual_seed(SEED + 1))

    eps1 = eps2 = None
    if train and noisy:  # the layer's documented order: randn(B, a), then randn(B·k1, b)
        g = torch.Generator().manual_seed(SEED + 1)
        eps1 = torch.randn((b, a), generator=g, dtype=x.dtype) if a > 1 else None
        eps2 = torch.randn((b * k1, s), generator=g, dtype=x.dtype)
    p, q = layer.primary_gate, layer.secondary_gate
    params = [p.w_gate, p.w_noise, q.w_gate, q.w_noise, layer.experts.w_in, layer.experts.w_out]
    y_ref, aux_ref, counts_ref = hierarchical_moe(x, *params, k1, k2, eps1, eps2, 0.3, 0.2)

    assert_matches_reference(out, (y_ref, aux_ref, counts_ref), x, params)


@pytest.mark.parametrize("train", [True, False])
def test_one_group_hierarchical_equals_flat(train):
    d, h, n = 6, 8, 5
    flat = MoE(d, h, n, k=2).double().train(train)
    hier = HierarchicalMoE(d, h, 1, n, k_primary=1, k_secondary=2).double().train(train)
    randomise_gates(flat)
    with torch.no_grad():
        hier.secondary_gate.w_gate[0] = flat.gate.w_gate
        hier.secondary_gate.w_noise[0] = flat.gate.w_noise
        hier.experts.w_in.copy_(flat.experts.w_in)
        hier.experts.w_out.copy_(flat.experts.w_out)
    (x,) = draw((16, d))
    a = flat(x, generator=torch.Generator().manual_seed(5))
    b = hier(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.y, b.y)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert torch.equal(a.stats.tokens_per_expert, b.stats.tokens_per_expert)


@pytest.mark.parametrize(
    "layer_fn", [lambda: MoE(8, 16, 6, 2), lambda: HierarchicalMoE(8, 16, 3, 4)]
)
def test_batch_time_input_equals_flattened(layer_fn):
    layer = layer_fn().eval()
    randomise_gates(layer)
    x = torch.randn(3, 7, 8)
    out = layer(x)
    assert out.y.shape == x.shape
    torch.testing.assert_close(out.y.reshape(-1, 8), layer(x.reshape(-1, 8)).y)


def test_single_expert_k1_equals_dense_ffn():
    layer = MoE(5, 9, 1, k=1).double()
    (x,) = draw((11, 5))
    out = layer(x, generator=torch.Generator().manual_seed(0))
    w_in, w_out = layer.experts.w_in[0], layer.experts.w_out[0]
    torch.testing.assert_close(out.y, torch.relu(x @ w_in) @ w_out)
    assert out.aux_loss.item() == 0.0
