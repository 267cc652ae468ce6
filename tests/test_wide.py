"""The flat layer with k = E as one wide FFN (moe_impl/layer/wide.py): equal to the blocked path to
rounding (float64 to 1e-12, bf16 autocast to bf16's), gradients by gradcheck, the kernel choice
(forced with expert_kernel("wide"), automatic on CUDA only, refused where it does not apply), and
the CPU default unchanged bit for bit."""

from __future__ import annotations

import pytest
import torch

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer.flat import wide_path
from moe_impl.layer.grouped import expert_kernel
from moe_impl.layer.wide import wide_expert_mlp
from moe_impl.layer.workspace import Workspace


def _layer(num_experts: int, dtype=torch.float64, **options) -> MoE:
    torch.manual_seed(num_experts)
    layer = MoE(12, 20, num_experts, k=num_experts, **options).to(dtype)
    with torch.no_grad():  # trained-looking gates, so that routing is not uniform
        layer.gate.w_gate.normal_()
        layer.gate.w_noise.normal_(std=0.5)
    return layer


def _run(layer: MoE, x: torch.Tensor, kernel: str) -> list[torch.Tensor]:
    """y, the losses and every gradient of one step under `kernel`, the noise from one seed."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with expert_kernel(kernel):
        out = layer(x, generator=torch.Generator().manual_seed(3))
    (out.y.square().sum() + out.aux_loss).backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [out.y, out.aux_loss, out.stats.tokens_per_expert, out.stats.load, *grads]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_experts", [1, 2, 4, 8])
def test_equals_blocked_in_float64(num_experts, training):
    layer = _layer(num_experts).train(training)
    x = torch.randn(3, 11, 12, dtype=torch.float64)  # leading dims are flattened
    wide, blocked = _run(layer, x, "wide"), _run(layer, x, "blocked")
    for a, b in zip(wide, blocked, strict=True):
        if a is None or b is None:  # no gradient on either path (eval: W_noise; one expert: gates)
            assert a is None and b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_equals_blocked_under_bf16_autocast():
    layer = _layer(4, torch.float32)
    x = torch.randn(64, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide, blocked = _run(layer, x, "wide"), _run(layer, x, "blocked")
    assert wide[0].dtype == blocked[0].dtype
    for a, b in zip(wide, blocked, strict=True):  # bf16 rounds at other places: ~2^-8 relative
        a, b = a.float(), b.float()
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_gradcheck():
    torch.manual_seed(0)
    num_experts, d, h, tokens = 3, 4, 5, 6
    x = torch.randn(tokens, d, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(tokens, num_experts, dtype=torch.float64).softmax(-1).requires_grad_()
    w_in = torch.randn(num_experts, d, h, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(num_experts, h, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(wide_expert_mlp, (x, gate, w_in, w_out))
    ws = Workspace()
    assert torch.autograd.gradcheck(
        lambda *a: wide_expert_mlp(*a, workspace=ws), (x, gate, w_in, w_out)
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_weight_gradients_come_back_contiguous_in_the_weights_dtype(autocast):
    """So that autograd can keep them as .grad without a copy of its own."""
    torch.manual_seed(2)
    x, gate = torch.randn(16, 4), torch.rand(16, 3)
    w_in = torch.randn(3, 4, 6, requires_grad=True)
    w_out = torch.randn(3, 6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = wide_expert_mlp(x, gate, w_in, w_out)
    for g in torch.autograd.grad(y.float().square().sum(), (w_in, w_out)):
        assert g.dtype == torch.float32 and g.is_contiguous()


def test_closed_form_against_a_loop():
    """y_b = Σ_e gate[b, e] · relu(x_b w_in[e]) w_out[e], written out."""
    torch.manual_seed(1)
    x = torch.randn(7, 4, dtype=torch.float64)
    gate = torch.rand(7, 3, dtype=torch.float64)
    w_in, w_out = (
        torch.randn(3, 4, 6, dtype=torch.float64),
        torch.randn(3, 6, 4, dtype=torch.float64),
    )
    loop = sum(gate[:, e, None] * ((x @ w_in[e]).relu() @ w_out[e]) for e in range(3))
    torch.testing.assert_close(wide_expert_mlp(x, gate, w_in, w_out), loop, rtol=1e-13, atol=1e-13)


def test_cpu_default_is_the_blocked_path_bit_for_bit():
    layer = _layer(4, torch.float32)
    x = torch.randn(40, 12)
    for a, b in zip(_run(layer, x, "auto"), _run(layer, x, "blocked"), strict=True):
        assert torch.equal(a, b)


def test_auto_choice_by_device():
    cfg = _layer(4).config
    assert not wide_path(cfg, None, torch.device("cpu"))
    assert wide_path(cfg, None, torch.device("cuda"))
    assert not wide_path(cfg, 5, torch.device("cuda"))  # a capacity limit drops slots
    with expert_kernel("wide"):
        assert wide_path(cfg, None, torch.device("cpu"))
    with expert_kernel("blocked"):
        assert not wide_path(cfg, None, torch.device("cuda"))


def test_forced_wide_is_refused_where_it_does_not_apply():
    x = torch.randn(10, 12)
    flat = MoE(12, 20, 8, k=2)
    with expert_kernel("wide"), pytest.raises(ValueError, match="k=2, num_experts=8"):
        flat(x)
    capped = MoE(12, 20, 4, k=4, capacity_factor=1.0)
    with expert_kernel("wide"), pytest.raises(ValueError, match=r"capacity_factor=1\.0"):
        capped(x)
    sparse = MoE(12, 20, 4, k=4, sparse_grad=True)
    with expert_kernel("wide"), pytest.raises(ValueError, match="sparse_grad=True"):
        sparse(x)
    hierarchical = HierarchicalMoE(12, 20, 2, 2)
    with expert_kernel("wide"), pytest.raises(ValueError, match="expert_kernel\\('wide'\\)"):
        hierarchical(x)


def test_no_tokens():
    layer = _layer(4, torch.float32)
    x = torch.randn(0, 12, requires_grad=True)
    with expert_kernel("wide"):
        out = layer(x)
    (out.y.sum() + out.aux_loss).backward()
    assert out.y.shape == (0, 12) and x.grad.shape == (0, 12)
    assert torch.equal(layer.experts.w_in.grad, torch.zeros_like(layer.experts.w_in))
    assert torch.equal(layer.experts.w_out.grad, torch.zeros_like(layer.experts.w_out))


def test_a_second_forward_before_backward_keeps_the_first():
    """The workspace must not hand the first pass's saved activations to the second."""
    layer = _layer(4, torch.float32).eval()
    x1, x2 = torch.randn(30, 12), torch.randn(30, 12)
    with expert_kernel("wide"):
        alone = [t.detach().clone() for t in _run(layer, x1, "wide")[:1]]
        layer.zero_grad(set_to_none=True)
        a = x1.clone().requires_grad_()
        y1 = layer(a).y
        y2 = layer(x2.clone().requires_grad_()).y
        y1.square().sum().backward()
        y2.square().sum().backward()
    torch.testing.assert_close(y1.detach(), alone[0], rtol=0, atol=0)
    reference_grad = a.grad.clone()
    layer.zero_grad(set_to_none=True)
    a2 = x1.clone().requires_grad_()
    with expert_kernel("wide"):
        layer(a2).y.square().sum().backward()
    torch.testing.assert_close(reference_grad, a2.grad, rtol=0, atol=0)


def test_kept_compute_copies_change_nothing():
    """Under autocast the bank's bf16 copies of the weights (compute_copy.py) give the bits a cast
    in every forward gives."""
    layer = _layer(4, torch.float32)
    x = torch.randn(48, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = _run(layer, x, "wide")
        layer.experts.keep_compute_copies = False
        cast = _run(layer, x, "wide")
    for a, b in zip(kept, cast, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
