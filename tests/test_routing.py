"""Routing behaviour: initial routing, edge values of k, eval mode, errors, dispatch bookkeeping."""

from __future__ import annotations

import pytest
import torch

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer.dispatch import make_plan


def test_zero_init_routes_uniformly_at_random():
    layer = MoE(8, 4, 16, k=2).train()
    out = layer(torch.randn(4000, 8), generator=torch.Generator().manual_seed(0))
    counts = out.stats.tokens_per_expert.double()
    assert counts.sum() == 8000
    expected = counts.mean()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # 15 degrees of freedom: p < 1e-4 under uniform routing
    # and it does not depend on the input: the same noise routes two different inputs alike
    other = layer(torch.randn(4000, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.stats.tokens_per_expert, other.stats.tokens_per_expert)


def test_zero_init_hierarchical_routes_uniformly():
    layer = HierarchicalMoE(8, 4, 4, 4).train()
    out = layer(torch.randn(4000, 8), generator=torch.Generator().manual_seed(0))
    counts = out.stats.tokens_per_expert.double()
    assert counts.sum() == 4000 * 4
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 45.0


def test_k_equal_n_uses_every_expert():
    layer = MoE(6, 5, 4, k=4).eval()
    x = torch.randn(20, 6)
    out = layer(x)
    assert torch.equal(out.stats.tokens_per_expert, torch.full((4,), 20))
    # zero gates: the softmax over all four logits is uniform, so y is the experts' mean
    experts = [torch.relu(x @ layer.experts.w_in[e]) @ layer.experts.w_out[e] for e in range(4)]
    torch.testing.assert_close(out.y, torch.stack(experts).mean(0))
    assert out.load_loss.item() == 0.0  # true counts are equal


def test_k1_output_is_the_selected_expert():
    layer = MoE(6, 5, 7, k=1).eval()
    with torch.no_grad():
        layer.gate.w_gate.normal_()
    x = torch.randn(30, 6)
    out = layer(x)
    choice = (x @ layer.gate.w_gate).argmax(-1)
    want = torch.stack(
        [
            torch.relu(x[b] @ layer.experts.w_in[e]) @ layer.experts.w_out[e]
            for b, e in enumerate(choice)
        ]
    )
    torch.testing.assert_close(out.y, want)


@pytest.mark.parametrize("layer_fn", [lambda: MoE(8, 6, 5, 2), lambda: HierarchicalMoE(8, 6, 3, 4)])
def test_eval_mode_is_deterministic_and_finite(layer_fn):
    layer = layer_fn().eval()  # zero gates: every logit ties, the worst case for top-k and the CDF
    x = torch.randn(64, 8)
    a, b = layer(x), layer(x)
    assert torch.equal(a.y, b.y)
    assert torch.isfinite(a.aux_loss) and torch.isfinite(a.y).all()
    a.aux_loss.backward()  # nothing divides by zero in the backward either
    for p in layer.parameters():
        assert p.grad is None or torch.isfinite(p.grad.to_dense()).all()


def test_training_noise_follows_the_generator():
    layer = MoE(8, 6, 16, 2).train()
    x = torch.randn(50, 8)
    a = layer(x, generator=torch.Generator().manual_seed(3))
    b = layer(x, generator=torch.Generator().manual_seed(3))
    c = layer(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.y, b.y)
    assert not torch.equal(a.stats.tokens_per_expert, c.stats.tokens_per_expert)


BAD_ARGS = [
    (lambda: MoE(8, 16, 4, k=5), "k=5 must be <= num_experts=4"),
    (lambda: MoE(8, 16, 4, k=0), "k must be a positive integer"),
    (lambda: MoE(0, 16, 4), "d_model"),
    (lambda: MoE(8, -1, 4), "d_hidden"),
    (lambda: MoE(8, 16, 0, k=1), "num_experts"),
    (lambda: MoE(8, 16, 4, 2, w_importance=-0.1), "w_importance"),
    (lambda: MoE(8, 16, 4, 2, w_load=float("nan")), "w_load"),
    (lambda: MoE(8, 16, 4, 2, capacity_factor=0.0), "capacity_factor"),
    (lambda: HierarchicalMoE(8, 16, 4, 4, k_primary=5), "k_primary=5 must be <= num_groups=4"),
    (lambda: HierarchicalMoE(8, 16, 4, 4, k_secondary=6), "k_secondary=6 must be <= group_size=4"),
    (lambda: HierarchicalMoE(8, 16, 0, 4), "num_groups"),
    (lambda: HierarchicalMoE(8, 16, 4, 2.5), "group_size"),
]


@pytest.mark.parametrize(("build", "message"), BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_them(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build()


@pytest.mark.parametrize("layer", [MoE(8, 6, 4, 2), HierarchicalMoE(8, 6, 2, 2)])
def test_wrong_input_width_raises_value_error(layer):
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))


EMPTY_BATCH_LAYERS = {
    "flat": lambda: MoE(8, 6, 4, 2),
    "hierarchical": lambda: HierarchicalMoE(8, 6, 2, 2),
    "flat-capacity-sparse": lambda: MoE(8, 6, 4, 2, capacity_factor=1.0, sparse_grad=True),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(EMPTY_BATCH_LAYERS))
def test_empty_batch_is_a_no_op(name, train):
    """No token: an empty y of the input's shape, nothing routed, every statistic 0, an aux loss of
    exactly 0 (CV² of an all-zero vector is 0 thanks to its epsilon, Eq. 7 and 10), no noise drawn,
    and a backward that runs and gives every parameter a zero (never NaN) gradient."""
    layer = EMPTY_BATCH_LAYERS[name]().train(train)
    num_experts = layer.config.num_experts
    x = torch.randn(3, 0, 8, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    rng_state = generator.get_state()
    out = layer(x, generator=generator)

    assert out.y.shape == (3, 0, 8) and out.y.dtype == x.dtype
    assert torch.equal(generator.get_state(), rng_state)  # the next batch's noise is unchanged
    for loss in (out.aux_loss, out.importance_loss, out.load_loss):
        assert loss.shape == () and loss.item() == 0.0
    stats = out.stats
    assert torch.equal(stats.tokens_per_expert, torch.zeros(num_experts, dtype=torch.long))
    for value in (stats.importance, stats.load):
        assert torch.equal(value, torch.zeros(num_experts))
    for value in (stats.cv_importance, stats.cv_load, stats.max_over_mean_load):
        assert value.item() == 0.0
    assert stats.num_dropped == 0

    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == x.shape
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    # the graph reaches the experts and every gate (w_noise only where noise is drawn)
    assert {"experts.w_in", "experts.w_out"} <= grads.keys()
    assert any(n.endswith("w_gate") for n in grads)
    assert any(n.endswith("w_noise") for n in grads) == train
    assert grads["experts.w_in"].is_sparse == layer.experts.sparse_grad
    for n, grad in grads.items():
        assert torch.equal(grad.to_dense(), torch.zeros_like(grad.to_dense())), n


@pytest.mark.parametrize(("tokens", "num_experts"), [(64, 4), (64, 1024), (200, 37)])
def test_plan_places_every_slot_once_in_a_block_of_its_expert(tokens, num_experts):
    g = torch.Generator().manual_seed(0)
    expert_N = torch.randint(num_experts, (tokens * 2,), generator=g)
    token_N = torch.arange(tokens).repeat_interleave(2)
    plan = make_plan(expert_N, token_N, num_experts)
    assert torch.equal(plan.counts_E, torch.bincount(expert_N, minlength=num_experts))
    rows = plan.row_of_slot_N
    assert torch.equal(plan.slot_of_row_R[rows], torch.arange(expert_N.numel()))
    assert (plan.slot_of_row_R < expert_N.numel()).sum() == expert_N.numel()
    block_of_slot = rows // plan.block_size
    if plan.block_expert_L is None:
        assert torch.equal(block_of_slot, expert_N)
    else:
        assert torch.equal(plan.block_expert_L[block_of_slot], expert_N)
    assert torch.equal(plan.token_of_row_R[rows], token_N)


def test_capacity_drops_are_counted_and_zeroed():
    layer = MoE(4, 3, 4, k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        layer.gate.w_gate.zero_()
        layer.gate.w_gate[:, 0] = 1.0  # route every token with positive feature sum to expert 0
    x = torch.rand(40, 4)  # all positive: every token prefers expert 0, capacity is 10
    out = layer(x)
    assert out.stats.num_dropped == 30
    assert (out.y[10:] == 0).all() and (out.y[:10] != 0).any()
    assert MoE(4, 3, 4, k=1).eval()(x).stats.num_dropped == 0


@pytest.mark.parametrize("tokens", [8, 512])  # gathered and in-place dispatch layouts
def test_sparse_expert_gradients_equal_dense(tokens):
    torch.manual_seed(0)
    dense = HierarchicalMoE(6, 5, 4, 8, sparse_grad=False)
    sparse = HierarchicalMoE(6, 5, 4, 8, sparse_grad=True)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(tokens, 6)
    for layer in (dense, sparse):
        out = layer(x, generator=torch.Generator().manual_seed(1))
        (out.y.square().sum() + out.aux_loss).backward()
    assert sparse.experts.w_in.grad.is_sparse and not dense.experts.w_in.grad.is_sparse
    for name in ("w_in", "w_out"):
        got = getattr(sparse.experts, name).grad
        torch.testing.assert_close(got.to_dense(), getattr(dense.experts, name).grad)
        active = int((out.stats.tokens_per_expert > 0).sum())
        assert got.coalesce().indices().shape[1] <= active  # rows only for experts that got tokens


@pytest.mark.parametrize(
    "layer_fn", [lambda: MoE(16, 32, 8, 2), lambda: HierarchicalMoE(16, 32, 4, 4)]
)
def test_bf16_autocast_keeps_routing_and_trains(layer_fn):
    """Gate logits stay float32 under autocast: bf16 experts, same routing as float32."""
    layer = layer_fn().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "gate" in name:
                p.normal_()
    x = torch.randn(256, 16, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.equal(out.stats.tokens_per_expert, ref.stats.tokens_per_expert)
    assert out.y.dtype == torch.float32
    torch.testing.assert_close(out.y, ref.y, rtol=0.05, atol=0.05)
    (out.y.square().mean() + out.aux_loss).backward()
    assert x.grad.dtype == torch.float32 and layer.experts.w_in.grad.dtype == torch.float32
