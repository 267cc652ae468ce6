"""FactoredAdam (paper App. D): the formula, its exact rank-1 case, sparse rows, and training."""

from __future__ import annotations

import pytest
import torch

from moe_impl import HierarchicalMoE
from moe_impl.train.optim import FactoredAdam


def test_matches_the_formula_written_out():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = w.detach().clone()
    opt = FactoredAdam([w], lr=0.1, beta2=0.9, eps=1e-8)
    v_row, v_col = torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t in range(1, 4):
        g = torch.randn(3, 4, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        v_row = 0.9 * v_row + 0.1 * torch.tensor(
            [sum(g[i, j] ** 2 for j in range(4)) / 4 for i in range(3)]
        )
        v_col = 0.9 * v_col + 0.1 * torch.tensor(
            [sum(g[i, j] ** 2 for i in range(3)) / 3 for j in range(4)]
        )
        for i in range(3):
            for j in range(4):
                v_hat = v_row[i] * v_col[j] / (v_row.mean() * (1 - 0.9**t))
                ref[i, j] -= 0.1 * g[i, j] / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(w.detach(), ref)


def test_rank_one_second_moment_is_exact():
    """If g² = a·bᵀ the factored estimate equals g², so each step moves by lr·sign(g)."""
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([0.25, 1.0, 2.25, 4.0])
    signs = torch.tensor([[1.0, -1, 1, 1], [-1, -1, 1, -1], [1, 1, -1, 1]])
    g = (a[:, None] * b[None, :]).sqrt() * signs
    w = torch.zeros(3, 4, requires_grad=True)
    opt = FactoredAdam([w], lr=0.5, beta2=0.9, eps=0.0)
    for t in range(1, 4):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), -0.5 * t * signs)


def test_sparse_gradient_touches_only_its_experts():
    torch.manual_seed(1)
    sparse_w = torch.randn(6, 3, 4, requires_grad=True)
    dense_w = sparse_w.detach().clone().requires_grad_(True)
    rows = torch.tensor([1, 4])
    sparse_opt, dense_opt = FactoredAdam([sparse_w], lr=0.01), FactoredAdam([dense_w], lr=0.01)
    for _ in range(3):
        values = torch.randn(2, 3, 4)
        sparse_w.grad = torch.sparse_coo_tensor(
            rows[None], values, (6, 3, 4), check_invariants=True
        )
        dense_w.grad = torch.zeros(6, 3, 4).index_copy(0, rows, values)
        sparse_opt.step()
        dense_opt.step()
    torch.testing.assert_close(sparse_w.detach(), dense_w.detach())
    state = sparse_opt.state[sparse_w]
    assert state["step"].tolist() == [0, 3, 0, 0, 3, 0]  # untouched experts keep no history
    assert state["v_row"].shape == (6, 3) and state["v_col"].shape == (6, 4)


def test_trains_a_sparse_hierarchical_layer():
    torch.manual_seed(0)
    layer = HierarchicalMoE(8, 16, 4, 8, sparse_grad=True)
    experts = [layer.experts.w_in, layer.experts.w_out]
    gates = [p for n, p in layer.named_parameters() if "gate" in n]
    opts = [FactoredAdam(experts, lr=3e-3), torch.optim.Adam(gates, lr=3e-3)]
    x = torch.randn(256, 8)
    target = torch.tanh(x @ torch.randn(8, 8))
    losses = []
    for _ in range(60):
        out = layer(x)
        loss = (out.y - target).square().mean()
        (loss + out.aux_loss).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr"), ({"beta2": 1.0}, "beta2"), ({"eps": -1.0}, "eps")],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactoredAdam([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_rejects_vectors():
    with pytest.raises(ValueError, match="shape"):
        FactoredAdam([torch.zeros(5, requires_grad=True)])


def test_an_expert_without_gradient_stays_finite_when_subnormals_are_flushed():
    """Dense gradient, one expert all zero: its scale, correction · tiny, is a subnormal, which
    flushing (as CPU training does) would turn into 0 and the update into 0/0."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    w = torch.randn(3, 2, 4, requires_grad=True)
    start = w.detach().clone()
    opt = FactoredAdam([w], lr=0.01)
    for _ in range(2):
        w.grad = torch.randn(3, 2, 4)
        w.grad[1] = 0.0
        opt.step()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[1].detach(), start[1])  # no gradient, no move
