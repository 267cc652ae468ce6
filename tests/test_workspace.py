"""The expert bank's reused gradient memory (moe_impl/layer/workspace.py): a buffer is reused only
when nothing else holds it, so gradients are never overwritten, whether a loop sets them to None,
accumulates them, or a user keeps a reference. No timing here (docs/performance.md has it)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer.workspace import Workspace


def test_take_reuses_a_buffer_only_once_it_is_free():
    buffers, like = Workspace(), torch.zeros(1)
    a = buffers.take((4, 5), like)
    ptr = a.data_ptr()
    a.fill_(1.0)
    b = buffers.take((4, 5), like)  # `a` is alive: a fresh buffer
    assert b.data_ptr() != ptr
    b.fill_(2.0)
    assert torch.equal(a, torch.ones(4, 5))
    b_ptr, kept_view = b.data_ptr(), b[1:]  # a view of b's memory counts as a holder too
    del b
    c = buffers.take((4, 5), like)
    assert c.data_ptr() != b_ptr and torch.equal(kept_view, torch.full((3, 5), 2.0))
    del c
    d = buffers.take((4, 5), like)
    e = buffers.take((2, 5), like)  # d holds the buffer
    assert d.data_ptr() != e.data_ptr()
    del d, e
    f = buffers.take((3, 5), like)  # smaller requests fit the free buffer
    assert f.shape == (3, 5)


def test_take_follows_dtype():
    buffers = Workspace()
    a = buffers.take((2, 2), torch.zeros(1, dtype=torch.float64))
    assert a.dtype == torch.float64
    del a
    assert buffers.take((2, 2), torch.zeros(1)).dtype == torch.float32


def _layer(kind: str, sparse: bool):
    torch.manual_seed(0)
    if kind == "flat":
        return MoE(8, 16, 8, k=2, noisy_gating=False, sparse_grad=sparse)
    return HierarchicalMoE(8, 16, 4, 4, noisy_gating=False, sparse_grad=sparse)


def _grads(layer, x):
    out = layer(x)
    (out.y.square().mean() + out.aux_loss).backward()
    return [p.grad.to_dense().clone() for p in (layer.experts.w_in, layer.experts.w_out)]


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_accumulate_and_kept_references_survive(kind, sparse):
    layer = _layer(kind, sparse)
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8)
    g1 = _grads(layer, x1)
    layer.zero_grad(set_to_none=True)
    g2 = _grads(layer, x2)
    # the buffer was free after set_to_none: step 2's gradient lives in step 1's memory
    layer.zero_grad(set_to_none=True)
    _grads(layer, x1)
    ptr = layer.experts.w_in.grad
    ptr = (ptr._values() if sparse else ptr).data_ptr()
    layer.zero_grad(set_to_none=True)
    again = _grads(layer, x1)
    now = layer.experts.w_in.grad
    assert (now._values() if sparse else now).data_ptr() == ptr
    assert all(torch.equal(a, b) for a, b in zip(again, g1, strict=True))
    # accumulation without zeroing: g1 + g2, not a buffer written twice
    total = _grads(layer, x2)
    for t, a, b in zip(total, g1, g2, strict=True):
        torch.testing.assert_close(t, a + b)
    # a reference a user keeps is never written into
    kept = layer.experts.w_out.grad
    kept_copy = kept.to_dense().clone()
    layer.zero_grad(set_to_none=True)
    _grads(layer, x2)
    assert torch.equal(kept.to_dense(), kept_copy)


def test_buffers_are_not_state():
    layer = _layer("flat", False)
    _grads(layer, torch.randn(32, 8))
    assert not any("workspace" in k for k in layer.state_dict())
    size_before = len(pickle.dumps(_layer("flat", False)))
    assert len(pickle.dumps(layer)) < size_before + 4096  # the buffers are not pickled
    clone = copy.deepcopy(layer)
    assert clone.experts.workspace is not layer.experts.workspace
    f = io.BytesIO()
    torch.save(layer, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    _grads(loaded, torch.randn(32, 8))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_combine_equals_autograd_of_the_broadcast_sum_bit_for_bit(k):
    from moe_impl.layer.experts import _Combine
    from moe_impl.layer.workspace import Workspace

    torch.manual_seed(k)
    y = torch.randn(64, k, 16, requires_grad=True)
    gate = torch.rand(64, k, requires_grad=True)
    g = torch.randn(64, 16)
    ref = (y * gate.view(64, k, 1)).sum(1)
    ref_y, ref_gate = torch.autograd.grad(ref, (y, gate), g)
    for ws in (None, Workspace()):
        out = _Combine.apply(y, gate, ws)
        got_y, got_gate = torch.autograd.grad(out, (y, gate), g)
        assert (
            torch.equal(out, ref) and torch.equal(got_y, ref_y) and torch.equal(got_gate, ref_gate)
        )


def test_clear_gives_the_memory_back_and_the_layer_still_runs():
    layer = _layer("hierarchical", True)
    _grads(layer, torch.randn(32, 8))
    assert layer.experts.workspace._bufs and layer.secondary_gate.workspace._bufs
    layer.experts.workspace.clear()
    layer.secondary_gate.workspace.clear()
    assert not layer.experts.workspace._bufs and not layer.secondary_gate.workspace._bufs
    layer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(g).all() for g in _grads(layer, torch.randn(32, 8)))
