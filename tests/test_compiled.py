"""Compiled routing and combine (moe_impl/layer/compiled.py) against the eager path: outputs, aux
losses, routing and every gradient within float32 rounding, with noise, both layouts, dropped
slots and the grouped kernel; no graph breaks; the eager default untouched. Equality runs on the
aot_eager backend (the graphs torch.compile captures, without inductor's C++ build); one slow test
builds them with inductor."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer import compiled
from moe_impl.layer.grouped import expert_kernel, grouped_mm_available
from tests.helpers import randomise_gates

AOT = {"backend": "aot_eager"}

_LAYERS = {  # name -> factory; hierarchical 4 x 4 with k = 2 + 2
    "flat k=2": lambda: MoE(16, 24, 8, k=2),
    "flat k=E": lambda: MoE(16, 24, 4, k=4),  # no load estimator: the true counts
    "flat dropping": lambda: MoE(16, 24, 8, k=2, capacity_factor=0.5),
    "hierarchical": lambda: HierarchicalMoE(16, 24, 4, 4),
    "hierarchical dropping": lambda: HierarchicalMoE(16, 24, 4, 4, capacity_factor=0.5),
}


def _pair(name: str):
    torch.manual_seed(0)
    eager = _LAYERS[name]()
    randomise_gates(eager)
    other = _LAYERS[name]()
    other.load_state_dict(eager.state_dict())
    return eager, other


def _run(layer, x, seed: int = 3):
    x = x.detach().clone().requires_grad_()
    out = layer(x, generator=torch.Generator().manual_seed(seed))
    (out.y.square().sum() + out.aux_loss).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out, x.grad, grads


def _assert_same(eager, comp, x):
    out_e, gx_e, grads_e = _run(eager, x)
    out_c, gx_c, grads_c = _run(comp, x)
    assert torch.equal(out_e.stats.tokens_per_expert, out_c.stats.tokens_per_expert)
    assert out_e.stats.num_dropped == out_c.stats.num_dropped
    for field in ("y", "aux_loss", "importance_loss", "load_loss"):
        torch.testing.assert_close(getattr(out_c, field), getattr(out_e, field))
    torch.testing.assert_close(out_c.stats.load, out_e.stats.load)
    torch.testing.assert_close(gx_c, gx_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, msg=name)
    return out_e


@pytest.mark.parametrize("name", list(_LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_compiled_equals_eager(name, training):
    eager, comp = _pair(name)
    comp.compile_routing(**AOT)
    eager.train(training)
    comp.train(training)
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    out = _assert_same(eager, comp, x)
    if "dropping" in name and training:
        assert out.stats.num_dropped > 0  # the combine's zero rows are exercised


@pytest.mark.skipif(not grouped_mm_available(), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("name", ["flat k=2", "hierarchical"])
def test_compiled_equals_eager_with_the_grouped_kernel(name):
    eager, comp = _pair(name)
    comp.compile_routing(**AOT)
    with expert_kernel("grouped"):
        _assert_same(eager, comp, torch.randn(32, 16, generator=torch.Generator().manual_seed(2)))


def test_switches_every_gate_and_bank_and_back():
    layer = HierarchicalMoE(8, 8, 2, 4)
    assert not layer.routing_compiled
    assert layer.compile_routing(**AOT) is layer and layer.routing_compiled
    parts = (layer.primary_gate, layer.secondary_gate, layer.experts)
    assert all(p.compiled is compiled.routing_functions(**AOT) for p in parts)
    assert layer.eager_routing() is layer and not layer.routing_compiled


def test_eager_routing_after_compiling_is_bit_for_bit_the_eager_path():
    eager, comp = _pair("hierarchical")
    comp.compile_routing(**AOT)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    _run(comp, x)
    comp.eager_routing()
    comp.zero_grad(set_to_none=True)
    out_e, gx_e, grads_e = _run(eager, x)
    out_c, gx_c, grads_c = _run(comp, x)
    assert torch.equal(out_e.y, out_c.y) and torch.equal(out_e.aux_loss, out_c.aux_loss)
    assert torch.equal(gx_e, gx_c)
    assert all(torch.equal(grads_c[n], g) for n, g in grads_e.items())


def _gate_args(noisy: bool):
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(32, 8, generator=g)
    noise = torch.randn(32, 8, generator=g) if noisy else None
    normal = torch.randn(32, 8, generator=g) if noisy else None
    return clean, noise, normal, 2, 1e-2


def _combine_args():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(40, 6, generator=g)  # 32 slots in 40 rows, 8 of them padding
    row_of_slot = torch.randperm(40, generator=g)[:32]
    row_of_slot[5] = 40  # a dropped slot
    slot_of_row = torch.full((40,), 32)
    slot_of_row[row_of_slot[row_of_slot < 40]] = torch.arange(32)[row_of_slot < 40]
    gate = torch.rand(8, 4, generator=g)
    return values, row_of_slot, slot_of_row, gate


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (compiled.gate_math, _gate_args(True)),
        (compiled.gate_math, _gate_args(False)),
        (compiled.combine_forward, _combine_args()[:2] + _combine_args()[3:]),
        (compiled.combine_backward, (torch.randn(8, 6), *_combine_args())),
    ],
)
def test_compiled_regions_have_no_graph_break(fn, args):
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_combine_backward_is_the_autograd_of_the_forward():
    values, row_of_slot, slot_of_row, gate = _combine_args()
    values = values.double().requires_grad_()
    gate = gate.double().requires_grad_()
    g_BD = torch.randn(8, 6, dtype=torch.float64)
    y = compiled.combine_forward(values, row_of_slot, gate)
    ref = torch.autograd.grad(y, (values, gate), g_BD)
    ours = compiled.combine_backward(g_BD, values, row_of_slot, slot_of_row, gate)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_inductor_build_equals_eager():
    """The default backend (inductor: a C++ build on the CPU, tens of seconds)."""
    eager, comp = _pair("hierarchical")
    comp.compile_routing()
    _assert_same(eager, comp, torch.randn(64, 16, generator=torch.Generator().manual_seed(5)))


def test_a_compiled_layer_pickles_and_its_copy_routes_eagerly(monkeypatch):
    """torch.save / copy.deepcopy of a layer with compiled routing: the copy is the same layer,
    eager (torch.compile's wrappers do not pickle), and the original stays compiled."""
    monkeypatch.setitem(compiled.DEFAULTS, "backend", "aot_eager")
    torch.manual_seed(0)
    layer = HierarchicalMoE(8, 16, 3, 4).compile_routing()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (loaded, copy.deepcopy(layer)):
        assert not copied.routing_compiled and layer.routing_compiled
        x = torch.randn(16, 8)
        got = copied(x, generator=torch.Generator().manual_seed(1))
        want = layer(x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.y, want.y)
