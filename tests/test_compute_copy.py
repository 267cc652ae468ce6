"""The experts' compute-dtype weight copies (moe_impl/layer/compute_copy.py) under CPU bf16
autocast: the layer's outputs and gradients bit for bit those of the per-forward cast, the copies
equal to a fresh cast after every optimizer step, recast only where the weights changed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import randomise_gates
from torch import nn

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer import compute_copy
from moe_impl.layer import experts as experts_module
from moe_impl.layer.grouped import expert_kernel, grouped_mm_available
from moe_impl.train.config import TrainSection
from moe_impl.train.optim import FactoredAdam, build_optimizers

BF16 = torch.bfloat16
D, H = 16, 32

# (name, layer factory, tokens, expert kernel, layout the blocked kernel must run: "in place",
# "gathered" or None for the grouped kernel)
CASES = [
    ("flat in place", lambda: MoE(D, H, 4, k=2, sparse_grad=False), 64, "blocked", "in place"),
    ("flat gathered", lambda: MoE(D, H, 64, k=2, sparse_grad=False), 8, "blocked", "gathered"),
    ("sparse in place", lambda: MoE(D, H, 4, k=2, sparse_grad=True), 64, "blocked", "in place"),
    ("sparse gathered", lambda: MoE(D, H, 64, k=2, sparse_grad=True), 8, "blocked", "gathered"),
    ("hierarchical", lambda: HierarchicalMoE(D, H, 4, 4, sparse_grad=False), 32, "blocked", None),
    ("hier. sparse", lambda: HierarchicalMoE(D, H, 8, 8, sparse_grad=True), 8, "blocked", None),
    ("grouped", lambda: MoE(D, H, 6, k=2, sparse_grad=False), 24, "grouped", None),
    ("grouped sparse", lambda: MoE(D, H, 6, k=2, sparse_grad=True), 4, "grouped", None),
]
IDS = [c[0] for c in CASES]


def make(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = factory()
    randomise_gates(layer)
    return layer


def data(tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, D, generator=g), torch.randn(tokens, D, generator=g)


def forward_backward(layer, x, r, kernel: str = "blocked", seed: int = 5) -> list[torch.Tensor]:
    """y, and the gradients of x, w_in and w_out (sparse ones as (indices, values)), of one
    training forward under CPU bf16 autocast."""
    x = x.clone().requires_grad_(True)
    bank = layer.experts
    with expert_kernel(kernel), torch.autocast("cpu", dtype=BF16):
        out = layer(x, generator=torch.Generator().manual_seed(seed))
    loss = (out.y.float() * r).sum() + out.aux_loss
    grads = torch.autograd.grad(loss, [x, bank.w_in, bank.w_out])
    flat = [out.y.detach(), grads[0]]
    for g in grads[1:]:
        flat += [g._indices(), g._values()] if g.is_sparse else [g]
    return flat


@pytest.mark.parametrize(("name", "factory", "tokens", "kernel", "layout"), CASES, ids=IDS)
def test_outputs_and_gradients_equal_the_per_forward_cast(
    name, factory, tokens, kernel, layout, monkeypatch
):
    if kernel == "grouped" and not grouped_mm_available():
        pytest.skip("this torch has no torch._grouped_mm")
    layouts = []
    block_mlp = experts_module.block_expert_mlp

    def spy(x, w_in, w_out, block_expert_L, *args, **kwargs):
        layouts.append("in place" if block_expert_L is None else "gathered")
        return block_mlp(x, w_in, w_out, block_expert_L, *args, **kwargs)

    monkeypatch.setattr(experts_module, "block_expert_mlp", spy)
    layer = make(factory)
    x, r = data(tokens)
    layer.experts.keep_compute_copies = False
    want = forward_backward(layer, x, r, kernel)
    assert all(c.tensor is None for c in layer.experts.compute_copies)
    layer.experts.keep_compute_copies = True
    got = forward_backward(layer, x, r, kernel)
    assert [c.full_casts for c in layer.experts.compute_copies] == [1, 1]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if layout is not None:
        assert set(layouts) == {layout}


def _train(layer, optimizers, x, r, steps: int, check) -> None:
    for step in range(steps):
        xs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            out = layer(xs, generator=torch.Generator().manual_seed(step))
        ((out.y.float() * r).sum() + out.aux_loss).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        check(layer)


def _copies_current(layer) -> None:
    """The kept copies, read as a forward would, equal a fresh cast of the parameters."""
    bank = layer.experts
    for keep, p in zip(bank.compute_copies, (bank.w_in, bank.w_out), strict=True):
        assert torch.equal(keep.get(p, BF16), p.detach().to(BF16))


# (layer factory, tokens, train.expert_optimizer): dense Adam (fused), and FactoredAdam on sparse
# gradients as build_optimizers makes them, in the gathered and the in-place layouts
TRAIN_CASES = [
    (lambda: MoE(D, H, 4, k=2, sparse_grad=False), 64, "adam"),
    (lambda: MoE(D, H, 64, k=2, sparse_grad=True), 8, "factored"),
    (lambda: MoE(D, H, 4, k=2, sparse_grad=True), 64, "factored"),
    (lambda: HierarchicalMoE(D, H, 8, 8, sparse_grad=True), 8, "factored"),
    (lambda: MoE(D, H, 64, k=2, sparse_grad=True), 8, "sparse_adam"),  # torch's SparseAdam
]


def _optimizers(model: nn.Module, choice: str) -> list[torch.optim.Optimizer]:
    if choice != "sparse_adam":
        return build_optimizers(model, TrainSection(lr=0.05, expert_optimizer=choice))[0]
    bank = model.moe.experts
    rest = [p for p in model.parameters() if p is not bank.w_in and p is not bank.w_out]
    return [torch.optim.SparseAdam([bank.w_in, bank.w_out], lr=0.05), torch.optim.Adam(rest)]


@pytest.mark.parametrize(("factory", "tokens", "choice"), TRAIN_CASES)
def test_training_with_copies_equals_training_without(factory, tokens, choice):
    x, r = data(tokens)
    params = []
    for keep in (False, True):
        model = nn.Module()
        model.moe = make(factory)
        model.moe.experts.keep_compute_copies = keep
        optimizers = _optimizers(model, choice)
        _train(model.moe, optimizers, x, r, 5, _copies_current if keep else lambda _: None)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


# (FULL_RECAST_SHARE, CPU_CHUNK_BYTES): the rows recast alone, in one chunk or in chunks of 3
# rows (D·H float32 values each), or the whole copy in place
RECASTS = [(1.0, 1 << 20), (1.0, 3 * D * H * 4), (0.0, 1 << 20)]


@pytest.mark.parametrize(("share", "chunk_bytes"), RECASTS)
def test_a_sparse_step_recasts_the_changed_rows_without_a_full_cast(
    share, chunk_bytes, monkeypatch
):
    monkeypatch.setattr(compute_copy, "FULL_RECAST_SHARE", share)
    monkeypatch.setattr(compute_copy, "CPU_CHUNK_BYTES", chunk_bytes)
    layer = make(lambda: MoE(D, H, 64, k=2, sparse_grad=True))
    bank = layer.experts
    x, r = data(8)
    optimizer = FactoredAdam([bank.w_in, bank.w_out], lr=0.05)
    active = []

    def check(layer) -> None:  # right after the step: valid without a recast, equal to a cast
        for keep, p in zip(bank.compute_copies, (bank.w_in, bank.w_out), strict=True):
            assert keep.tensor is not None and torch.equal(keep.tensor, p.detach().to(BF16))

    bank.w_in.register_hook(lambda grad: active.append(grad._indices().shape[1]))
    _train(layer, [optimizer], x, r, 3, check)
    assert 0 < max(active) <= 16  # a sparse step: most experts idle
    for keep in bank.compute_copies:
        assert keep.full_casts == 1  # the first forward's only
        assert keep.rows_cast == sum(active)


def test_forwards_within_a_step_cast_once():
    layer = make(lambda: MoE(D, H, 4, k=2, sparse_grad=False))
    bank = layer.experts
    x, r = data(32)
    for _ in range(3):  # three micro-batches' forwards and backwards, one evaluation forward
        forward_backward(layer, x, r)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        layer.eval()(x)
    assert [c.full_casts for c in bank.compute_copies] == [1, 1]
    # a fused step bumps no version counter: the optimizer step pre-hook frees the copies
    adam = torch.optim.Adam(layer.parameters(), lr=0.01, fused=True)
    version = bank.w_in._version
    with torch.autocast("cpu", dtype=BF16):
        layer.train()(x).y.float().sum().backward()
    adam.step()
    assert bank.w_in._version == version
    assert all(c.tensor is None for c in bank.compute_copies)
    want = [bank.w_in.detach().to(BF16), bank.w_out.detach().to(BF16)]
    forward_backward(layer, x, r)
    assert [c.full_casts for c in bank.compute_copies] == [2, 2]
    for keep, cast in zip(bank.compute_copies, want, strict=True):
        assert torch.equal(keep.tensor, cast)


def _edit_under_no_grad(layer) -> None:
    with torch.no_grad():
        layer.experts.w_in[1].add_(0.25)
        layer.experts.w_out[2, :, 3] = 1.0


def _load_other_state(layer) -> None:
    layer.load_state_dict(make(lambda: MoE(D, H, 4, k=2, sparse_grad=False), seed=9).state_dict())


def _new_storage(layer) -> None:  # what .to(another device) does: the same parameters, new data
    layer._apply(lambda t: t.clone())


INVALIDATIONS = [
    (_edit_under_no_grad, torch.float32, BF16),
    (_load_other_state, torch.float32, BF16),
    (_new_storage, torch.float32, BF16),
    (lambda layer: layer.double(), torch.float64, BF16),
    (lambda layer: None, torch.float32, torch.float16),  # another autocast dtype
]


@pytest.mark.parametrize(("change", "param_dtype", "dtype"), INVALIDATIONS)
def test_any_other_change_recasts_everything(change, param_dtype, dtype):
    layer = make(lambda: MoE(D, H, 4, k=2, sparse_grad=False))
    bank = layer.experts
    x, r = data(32)
    forward_backward(layer, x, r)
    change(layer)
    assert bank.w_in.dtype == param_dtype
    x, r = x.to(param_dtype), r.to(param_dtype)

    def run(keep: bool) -> list[torch.Tensor]:
        bank.keep_compute_copies = keep
        xs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = layer(xs, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad((out.y * r).sum(), [xs, bank.w_in, bank.w_out])
        return [out.y.detach(), *grads]

    got = run(True)
    for keep, p in zip(bank.compute_copies, (bank.w_in, bank.w_out), strict=True):
        assert keep.full_casts == 2  # the first forward's, and the recast after the change
        assert keep.tensor is not None and keep.tensor.dtype == dtype
        assert torch.equal(keep.tensor, p.detach().to(dtype))
    want = run(False)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_no_copies_outside_autocast_and_none_in_state():
    layer = make(lambda: MoE(D, H, 4, k=2, sparse_grad=False)).eval()  # eval: no noise
    bank = layer.experts
    x, _ = data(16)
    layer(x)  # float32: the experts compute in float32, no copy needed
    assert all(c.tensor is None and c.full_casts == 0 for c in bank.compute_copies)
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
    assert all(c.tensor is not None for c in bank.compute_copies)
    assert set(layer.state_dict()) == set(make(lambda: MoE(D, H, 4, k=2)).state_dict())
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert all(c.tensor is None for c in clone.experts.compute_copies)
        with torch.autocast("cpu", dtype=BF16):
            torch.testing.assert_close(clone(x).y, layer(x).y, rtol=0, atol=0)
    bank.keep_compute_copies = False
    assert all(c.tensor is None for c in bank.compute_copies)
