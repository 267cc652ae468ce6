"""The combine from the experts' buffer rows (moe_impl/layer/combine.py) against the two-step path
it replaces, dispatch.from_rows then experts._Combine: the output and both gradients bit for bit,
in every blocked layout (in place, gathered, padded, with dropped slots), float32 and float64,
with and without a workspace."""

from __future__ import annotations

import pytest
import torch

from moe_impl.layer.combine import combine_rows
from moe_impl.layer.dispatch import from_rows, make_plan
from moe_impl.layer.experts import _Combine
from moe_impl.layer.workspace import Workspace


def _two_step(values, gate, plan, ws):
    num_tokens, k = gate.shape
    rows = from_rows(values, plan, ws).view(num_tokens, k, values.shape[1])
    return _Combine.apply(rows, gate, ws)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that -0 and +0 count as different."""
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("num_experts", "k", "tokens", "capacity"),
    [(4, 4, 33, None), (8, 2, 50, None), (64, 4, 40, None), (8, 2, 50, 6), (16, 1, 9, 1)],
)
def test_equals_from_rows_then_combine_bit_for_bit(num_experts, k, tokens, capacity, dtype):
    torch.manual_seed(num_experts + k + tokens)
    expert_N = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)]).reshape(-1)
    token_N = torch.arange(tokens).repeat_interleave(k)
    plan = make_plan(expert_N, token_N, num_experts, capacity=capacity)
    assert (capacity is not None) == (plan.num_dropped > 0)
    values = torch.randn(plan.slot_of_row_R.numel(), 16, dtype=dtype, requires_grad=True)
    gate = torch.rand(tokens, k, dtype=dtype).softmax(-1).requires_grad_()
    g = torch.randn(tokens, 16, dtype=dtype)
    g[0] = -g[0].abs()  # token 0's rows stand in for padding: a negative gradient there gives -0
    want = _two_step(values, gate, plan, None)
    want_values, want_gate = torch.autograd.grad(want, (values, gate), g)
    for ws in (None, Workspace()):
        got = combine_rows(values, gate, plan, ws)
        got_values, got_gate = torch.autograd.grad(got, (values, gate), g)
        for a, b in ((got, want), (got_values, want_values), (got_gate, want_gate)):
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def test_a_layer_gives_what_it_gave_through_the_two_step_combine(monkeypatch):
    """The whole hierarchical layer (padded in-place blocks) with the new combine and with the
    two-step one patched in: output and every gradient bit for bit."""
    from moe_impl import HierarchicalMoE
    from moe_impl.layer import experts

    def run():
        torch.manual_seed(0)
        layer = HierarchicalMoE(8, 12, 4, 4)
        x = torch.randn(64, 8, requires_grad=True)
        out = layer(x, generator=torch.Generator().manual_seed(1))
        (out.y.square().sum() + out.aux_loss).backward()
        return [out.y, x.grad, *(p.grad for p in layer.parameters())]

    new = run()
    monkeypatch.setattr(experts, "combine_rows", _two_step)
    old = run()
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(new, old, strict=True))
