"""MoEConfig.gate_precision (moe_impl/layer/gate_precision.py): float32 is the plain matmul, bit
for bit; tf32 is float32 on a CPU; bf16 equals bf16-rounded operands multiplied in float64, forward
and backward, with float32 results and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates

from moe_impl import HierarchicalMoE, MoE, MoEConfig
from moe_impl.layer.gate_precision import round_to_bf16, tf32_matmuls
from moe_impl.layer.gating import gate_matmul
from moe_impl.layer.hierarchical import block_gate_matmul


def _bf16_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with both rounded to bf16, multiplied in float64, then float32."""
    return (round_to_bf16(a.float()).double() @ round_to_bf16(b.float()).double()).float()


def _step(layer, x, seed=0):
    """y, aux loss, the input's and every parameter's gradient of one training step."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, generator=torch.Generator().manual_seed(seed))
    (out.y.square().sum() + out.aux_loss).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.y, out.aux_loss, x.grad, grads


def _layers(precision: str):
    torch.manual_seed(0)
    flat = MoE(8, 16, 6, k=2, gate_precision=precision)
    torch.manual_seed(0)
    hier = HierarchicalMoE(8, 16, 3, 4, gate_precision=precision)
    for layer in (flat, hier):
        randomise_gates(layer)
    return flat, hier


def test_float32_gate_matmul_is_the_plain_matmul_bit_for_bit():
    x, w = torch.randn(37, 8), torch.randn(8, 5)
    plain = torch.matmul(x, w)
    assert torch.equal(gate_matmul(x, w), plain)
    assert torch.equal(gate_matmul(x, w, "float32"), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32 under autocast
        assert torch.equal(gate_matmul(x, w, "float32"), plain)


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_float32_and_cpu_tf32_layers_equal_the_default_layer_bit_for_bit(precision):
    """The default layer is float32; TF32 does not exist on a CPU, so "tf32" runs float32 there."""
    x = torch.randn(5, 7, 8)
    for default, other in zip(_layers("float32"), _layers(precision), strict=True):
        assert default.config.gate_precision == "float32"
        other.load_state_dict(default.state_dict())
        y_a, aux_a, gx_a, grads_a = _step(default, x)
        y_b, aux_b, gx_b, grads_b = _step(other, x)
        assert torch.equal(y_a, y_b) and torch.equal(aux_a, aux_b) and torch.equal(gx_a, gx_b)
        for name, g in grads_a.items():
            assert torch.equal(g.to_dense(), grads_b[name].to_dense()), name


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gate_matmul_equals_bf16_operands_in_float64(x_dtype):
    x = torch.randn(64, 48, dtype=x_dtype, requires_grad=True)
    w = torch.randn(48, 24, requires_grad=True)
    logits = gate_matmul(x, w, "bf16")
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _bf16_matmul_reference(x.detach(), w.detach()))
    g = torch.randn(64, 24)
    logits.backward(g)
    assert x.grad.dtype == x_dtype and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, _bf16_matmul_reference(x.detach().t(), g))


def test_bf16_gate_matmul_backward_equals_the_reference_for_float32_inputs():
    x = torch.randn(64, 48, requires_grad=True)
    w = torch.randn(48, 24, requires_grad=True)
    g = torch.randn(64, 24)
    gate_matmul(x, w, "bf16").backward(g)
    torch.testing.assert_close(x.grad, _bf16_matmul_reference(g, w.detach().t()))
    torch.testing.assert_close(w.grad, _bf16_matmul_reference(x.detach().t(), g))


def test_bf16_block_gate_matmul_equals_the_reference_per_block():
    """The secondary gates' blocked matmul: block l's rows times its group's weights."""
    x_LCD = torch.randn(5, 6, 8, requires_grad=True)
    w_GDS = torch.randn(3, 8, 4, requires_grad=True)
    block_group_L = torch.tensor([2, 0, 0, 1, 2])
    out = block_gate_matmul(x_LCD, w_GDS, block_group_L, None, "bf16")
    assert out.dtype == torch.float32
    g_LCS = torch.randn(out.shape)
    out.backward(g_LCS)
    grad_w = torch.zeros(3, 8, 4)
    for block, group in enumerate(block_group_L.tolist()):
        x, w, g = x_LCD.detach()[block], w_GDS.detach()[group], g_LCS[block]
        torch.testing.assert_close(out[block], _bf16_matmul_reference(x, w))
        torch.testing.assert_close(x_LCD.grad[block], _bf16_matmul_reference(g, w.t()))
        grad_w[group] += _bf16_matmul_reference(x.t(), g)
    assert w_GDS.grad.dtype == torch.float32
    torch.testing.assert_close(w_GDS.grad, grad_w)


def test_bf16_layers_round_their_gate_logits_and_train_their_gates_in_float32():
    flat, hier = _layers("bf16")
    x = torch.randn(40, 8)
    clean, _ = flat.gate.logits(x)
    torch.testing.assert_close(clean, _bf16_matmul_reference(x, flat.gate.w_gate.detach()))
    assert not torch.equal(clean, x @ flat.gate.w_gate.detach())  # the rounding shows
    for layer in (flat, hier):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, _, grads = _step(layer, x)
        for name, g in grads.items():
            if "gate" in name:
                assert g.dtype == torch.float32 and g.abs().sum() > 0, name


@pytest.mark.parametrize("bad", ["fp16", "BF16", None, 32])
def test_a_bad_gate_precision_raises_value_error_naming_it(bad):
    for build in (
        lambda: MoEConfig(d_model=8, d_hidden=16, num_experts=4, gate_precision=bad),
        lambda: MoE(8, 16, 4, gate_precision=bad),
        lambda: HierarchicalMoE(8, 16, 2, 2, gate_precision=bad),
    ):
        with pytest.raises(ValueError, match=rf"gate_precision.*{bad!r}"):
            build()


def test_tf32_scope_sets_and_restores_the_cuda_matmul_setting():
    """The flags exist without a GPU: the scope allows TF32 for CUDA only and puts back what was
    there (both of torch's APIs stay consistent, else torch refuses CUDA matmuls)."""
    matmul, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision, torch.get_float32_matmul_precision()
    mkldnn_before = mkldnn.fp32_precision
    try:
        for before in ("ieee", "none"):
            matmul.fp32_precision = before
            with tf32_matmuls(torch.device("cpu")):
                assert matmul.fp32_precision == before
            with tf32_matmuls(torch.device("cuda")):
                assert matmul.fp32_precision == "tf32" and matmul.allow_tf32
            assert matmul.fp32_precision == before and not matmul.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert mkldnn.fp32_precision == mkldnn_before  # other backends untouched
    finally:
        matmul.fp32_precision = saved[0]
        torch.set_float32_matmul_precision(saved[1])
