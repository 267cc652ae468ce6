"""The grouped-GEMM expert path (moe_impl/layer/grouped.py): which kernel is chosen, the grouped
layout of make_plan, the hand-written backward against a loop over experts, and the layers under
expert_kernel("grouped") against the blocked path with the same weights and noise."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer import experts as experts_module
from moe_impl.layer import grouped
from moe_impl.layer.dispatch import dispatch, from_rows, make_plan
from moe_impl.layer.grouped import (
    KERNELS,
    choose_kernel,
    compute_dtype,
    current_kernel,
    expert_kernel,
    grouped_expert_mlp,
    grouped_mm_available,
)

needs_grouped_mm = pytest.mark.skipif(
    not grouped_mm_available(), reason="this torch has no torch._grouped_mm"
)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SEED = 1234

# --- the choice ---------------------------------------------------------------------------------


def test_kernels_and_default():
    assert KERNELS == ("auto", "blocked", "grouped", "wide")
    assert current_kernel() == "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_cpu_is_blocked(dtype):
    assert choose_kernel(CPU, dtype, 64, 128) == "blocked"


@needs_grouped_mm
def test_forced_kernels_nest_and_restore():
    with expert_kernel("grouped"):
        assert current_kernel() == "grouped"
        assert choose_kernel(CPU, torch.float32, 64, 128) == "grouped"
        with expert_kernel("blocked"):
            assert choose_kernel(CPU, torch.float32, 64, 128) == "blocked"
            with expert_kernel("auto"):
                assert choose_kernel(CPU, torch.bfloat16, 64, 128) == "blocked"
            assert current_kernel() == "blocked"
        assert current_kernel() == "grouped"
    assert current_kernel() == "auto"


def test_forced_kernel_is_restored_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"), expert_kernel("blocked"):
        raise RuntimeError("inside")
    assert current_kernel() == "auto"


def test_bad_kernel_name():
    with pytest.raises(ValueError, match="'fast'") as error, expert_kernel("fast"):
        pass
    assert all(name in str(error.value) for name in KERNELS)
    assert current_kernel() == "auto"


@needs_grouped_mm
def test_forced_grouped_needs_aligned_rows():
    with expert_kernel("grouped"), pytest.raises(ValueError, match="16 bytes"):
        choose_kernel(CPU, torch.bfloat16, 12, 128)  # 24 bytes per row
    with expert_kernel("grouped"):
        assert choose_kernel(CPU, torch.float32, 12, 128) == "grouped"  # 48 bytes per row


# (capability, compute dtype, d_model, d_hidden, auto's choice on a mocked CUDA device)
CUDA_CASES = [
    ((9, 0), torch.bfloat16, 64, 128, "grouped"),
    ((10, 0), torch.bfloat16, 64, 128, "grouped"),
    ((8, 0), torch.bfloat16, 64, 128, "blocked"),  # Ampere
    ((9, 0), torch.float32, 64, 128, "blocked"),
    ((9, 0), torch.float16, 64, 128, "blocked"),
    ((9, 0), torch.bfloat16, 60, 128, "blocked"),  # d_model not a multiple of 8
    ((9, 0), torch.bfloat16, 64, 100, "blocked"),  # d_hidden not a multiple of 8
]


@needs_grouped_mm
@pytest.mark.parametrize(("capability", "dtype", "d", "h", "expected"), CUDA_CASES)
def test_auto_on_mocked_cuda(monkeypatch, capability, dtype, d, h, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_kernel(CUDA, dtype, d, h) == expected
    with expert_kernel("blocked"):
        assert choose_kernel(CUDA, dtype, d, h) == "blocked"


@needs_grouped_mm
def test_auto_keeps_more_experts_than_one_call_takes_blocked(monkeypatch):
    """From MAX_GROUPS + 1 experts the grouped path needs several calls (measured slower than the
    blocks on an H200), so auto keeps the blocks; forcing "grouped" still works."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    limit = grouped.MAX_GROUPS
    assert choose_kernel(CUDA, torch.bfloat16, 64, 128, limit) == "grouped"
    assert choose_kernel(CUDA, torch.bfloat16, 64, 128, limit + 1) == "blocked"
    with expert_kernel("grouped"):
        assert choose_kernel(CUDA, torch.bfloat16, 64, 128, 4 * limit) == "grouped"


def test_without_grouped_mm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_available()
    assert choose_kernel(CUDA, torch.bfloat16, 64, 128) == "blocked"
    with expert_kernel("grouped"), pytest.raises(ValueError, match="_grouped_mm"):
        choose_kernel(CUDA, torch.bfloat16, 64, 128)


def test_compute_dtype_follows_autocast():
    x = torch.zeros(2, 8)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    assert compute_dtype(x.double()) == torch.float64


# --- the grouped layout of make_plan -----------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 2])
def test_grouped_plan_layout_and_round_trip(capacity):
    g = torch.Generator().manual_seed(0)
    num_tokens, k, num_experts = 11, 2, 7
    expert_N = torch.stack(
        [torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)]
    )
    expert_N = expert_N.reshape(-1)
    expert_N[expert_N == 3] = 4  # expert 3 gets no slot
    token_N = torch.arange(num_tokens).repeat_interleave(k)
    plan = make_plan(expert_N, token_N, num_experts, capacity=capacity, grouped=True)
    blocked = make_plan(expert_N, token_N, num_experts, capacity=capacity)

    counts = torch.bincount(expert_N, minlength=num_experts)
    kept = counts if capacity is None else counts.clamp(max=capacity)
    assert plan.grouped and not blocked.grouped
    assert torch.equal(plan.counts_E, counts) and torch.equal(plan.kept_E, kept)
    assert torch.equal(blocked.kept_E, kept)
    assert plan.num_dropped == blocked.num_dropped == int((counts - kept).sum())
    rows = int(kept.sum())
    assert plan.block_expert_L is None and plan.block_size == rows and plan.num_blocks == 1
    slots = plan.slot_of_row_R
    assert slots.numel() == rows and bool((slots < expert_N.numel()).all())  # no padding row
    # sorted by expert, each expert's slots in batch order, only the first `capacity` kept
    assert torch.equal(expert_N[slots], torch.repeat_interleave(torch.arange(num_experts), kept))
    for e in range(num_experts):
        mine = slots[expert_N[slots] == e]
        assert torch.equal(mine, (expert_N == e).nonzero().squeeze(1)[: mine.numel()])
    assert torch.equal(plan.token_of_row_R, token_N[slots])
    kept_N = plan.row_of_slot_N < rows
    assert torch.equal(plan.row_of_slot_N[slots], torch.arange(rows))

    # dispatch then from_rows gives each kept slot its token's row, dropped slots 0; both ways
    x = torch.randn(num_tokens, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = from_rows(dispatch(x, plan, k), plan)
    want = x.repeat_interleave(k, 0) * kept_N[:, None]
    torch.testing.assert_close(y, want)
    r = torch.randn(y.shape, dtype=y.dtype, generator=g)
    (got,) = torch.autograd.grad((y * r).sum(), x)
    (exp,) = torch.autograd.grad((want * r).sum(), x)
    torch.testing.assert_close(got, exp)
    # the blocked plan of the same slots computes the same thing
    torch.testing.assert_close(from_rows(dispatch(x, blocked, k), blocked), want)


def test_grouped_plan_of_no_slots():
    empty = torch.zeros(0, dtype=torch.long)
    plan = make_plan(empty, empty, 5, grouped=True)
    assert plan.num_blocks == 0 and plan.slot_of_row_R.numel() == 0
    x = torch.randn(0, 4, requires_grad=True)
    y = from_rows(dispatch(x, plan, 2), plan)
    assert y.shape == (0, 4)


# --- the Function against a loop over experts ---------------------------------------------------


def loop_mlp(x_RD, w_in, w_out, counts):
    """relu(x · w_in[e]) · w_out[e], one expert at a time."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(torch.relu(x_RD[start : start + n] @ w_in[e]) @ w_out[e])
        start += n
    return torch.cat(out) if out else x_RD.new_zeros(0, w_out.shape[-1])


COUNTS = [
    [3, 1, 4, 2, 5, 1],  # every expert active: weights in place
    [3, 0, 4, 0, 0, 6],  # idle experts: the active ones' weights gathered
    [0, 0, 0, 9, 0, 0],  # a single active expert
    [0, 0, 0, 0, 0, 0],  # no rows at all
]


@needs_grouped_mm
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("max_groups", [1024, 2])
def test_function_matches_loop(monkeypatch, counts, sparse, max_groups):
    """max_groups=2 splits every grouped matmul into calls of at most 2 experts, as CUDA's limit
    of 1024 groups per call does for 1024+ active experts."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(counts)
    num_experts, d, h = counts.numel(), 8, 12
    w_in = torch.randn(num_experts, d, h, generator=g, requires_grad=True)
    w_out = torch.randn(num_experts, h, d, generator=g, requires_grad=True)
    x = torch.randn(int(counts.sum()), d, generator=g, requires_grad=True)
    r = torch.randn(x.shape, generator=g)

    y = grouped_expert_mlp(x, w_in, w_out, counts, sparse_grad=sparse)
    got = torch.autograd.grad((y * r).sum(), [x, w_in, w_out], allow_unused=True)
    want_y = loop_mlp(x, w_in, w_out, counts)
    want = torch.autograd.grad((want_y * r).sum(), [x, w_in, w_out], allow_unused=True)
    want = [
        torch.zeros_like(t) if w is None else w for w, t in zip(want, [x, w_in, w_out], strict=True)
    ]

    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b, atol=1e-5, rtol=1e-4)
    active = counts.nonzero().squeeze(1)
    for gw in got[1:]:
        assert gw.is_sparse == sparse
        if sparse:  # the layout of expert_mlp.block_expert_mlp: sparse_dim 1, coalesced, sorted
            assert gw.is_coalesced() and gw.sparse_dim() == 1
            assert torch.equal(gw.indices()[0], active)


@needs_grouped_mm
def test_function_dtypes_under_autocast():
    """bf16 compute under autocast; x's gradient in x's dtype, the weights' in theirs."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([2, 0, 3, 1])
    w_in = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    w_out = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_expert_mlp(x, w_in, w_out, counts, sparse_grad=False)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w_in.grad.dtype == w_out.grad.dtype == torch.float32
    want = loop_mlp(x.detach(), w_in.detach(), w_out.detach(), counts)
    torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)


@needs_grouped_mm
def test_function_never_builds_all_experts_when_few_are_active():
    """Many experts, few active, sparse gradients: only the active experts' rows exist."""
    counts = torch.zeros(4096, dtype=torch.long)
    counts[[5, 77, 4000]] = torch.tensor([2, 1, 3])
    w_in = torch.randn(4096, 8, 8, requires_grad=True)
    w_out = torch.randn(4096, 8, 8, requires_grad=True)
    x = torch.randn(6, 8, requires_grad=True)
    y = grouped_expert_mlp(x, w_in, w_out, counts, sparse_grad=True)
    for gw in torch.autograd.grad(y.sum(), [w_in, w_out]):
        assert gw.is_sparse and gw.values().shape == (3, 8, 8)
        assert gw.indices()[0].tolist() == [5, 77, 4000]


# --- the layers: grouped against blocked --------------------------------------------------------


def run(layer, x, kernel: str, autocast: bool = False):
    """Output, aux loss and the gradients of x and of every parameter (dense), under `kernel`."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with expert_kernel(kernel), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, generator=torch.Generator().manual_seed(SEED))
    r = torch.randn(out.y.shape, generator=torch.Generator().manual_seed(3))
    ((out.y.float() * r).sum() + out.aux_loss).backward()
    grads = [x.grad] + [
        torch.zeros_like(p) if p.grad is None else p.grad.to_dense() for p in layer.parameters()
    ]
    return out, grads


def assert_same(layer, x, monkeypatch, *, autocast=False, atol=1e-5, rtol=1e-4):
    calls = []
    real = experts_module.grouped_expert_mlp

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_module, "grouped_expert_mlp", counted)
    out_b, grads_b = run(layer, x, "blocked", autocast)
    assert calls == []
    out_g, grads_g = run(layer, x, "grouped", autocast)
    assert len(calls) == 1  # the experts ran grouped (the hierarchical group plan stays blocked)
    torch.testing.assert_close(out_g.y, out_b.y, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_g.aux_loss, out_b.aux_loss, atol=atol, rtol=rtol)
    assert torch.equal(out_g.stats.tokens_per_expert, out_b.stats.tokens_per_expert)
    assert out_g.stats.num_dropped == out_b.stats.num_dropped
    for a, b in zip(grads_g, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return out_b


def assert_case(layer, b: int, cf, idle: bool, monkeypatch) -> None:
    """assert_same on b random tokens, and that the case is what it claims: some experts idle,
    some slots dropped by the capacity."""
    randomise_gates(layer)
    x = torch.randn(b, 16, generator=torch.Generator().manual_seed(SEED))
    out = assert_same(layer, x, monkeypatch)
    if idle:
        assert bool((out.stats.tokens_per_expert == 0).any())
    if cf is not None:
        assert out.stats.num_dropped > 0


# (tokens, num_experts, k, capacity_factor, train, some experts idle)
FLAT_CASES = [
    (32, 4, 2, None, True, False),
    (24, 16, 2, None, True, False),
    (6, 64, 2, None, True, True),  # most experts idle: gathered weights
    (40, 8, 2, 0.5, True, False),  # capacity: slots dropped
    (20, 8, 2, None, False, False),  # eval
    (16, 1, 1, None, True, False),  # one expert
]


@needs_grouped_mm
@pytest.mark.parametrize(("b", "n", "k", "cf", "train", "idle"), FLAT_CASES)
@pytest.mark.parametrize("sparse", [False, True])
def test_flat_grouped_equals_blocked(monkeypatch, b, n, k, cf, train, idle, sparse):
    torch.manual_seed(0)
    layer = MoE(16, 24, n, k, capacity_factor=cf, sparse_grad=sparse).train(train)
    assert_case(layer, b, cf, idle, monkeypatch)


# (tokens, groups, group size, capacity_factor, train, some experts idle)
HIER_CASES = [
    (32, 2, 4, None, True, False),
    (5, 8, 16, None, True, True),
    (40, 4, 4, 0.5, True, False),
    (20, 4, 4, None, False, False),
]


@needs_grouped_mm
@pytest.mark.parametrize(("b", "a", "s", "cf", "train", "idle"), HIER_CASES)
@pytest.mark.parametrize("sparse", [False, True])
def test_hierarchical_grouped_equals_blocked(monkeypatch, b, a, s, cf, train, idle, sparse):
    torch.manual_seed(0)
    layer = HierarchicalMoE(16, 24, a, s, capacity_factor=cf, sparse_grad=sparse).train(train)
    assert_case(layer, b, cf, idle, monkeypatch)


@needs_grouped_mm
@pytest.mark.parametrize("hierarchical", [False, True])
def test_bf16_autocast_grouped_close_to_blocked(monkeypatch, hierarchical):
    torch.manual_seed(0)
    layer = HierarchicalMoE(16, 32, 4, 4) if hierarchical else MoE(16, 32, 8, 2)
    randomise_gates(layer)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(SEED))
    assert_same(layer, x, monkeypatch, autocast=True, atol=5e-2, rtol=5e-2)


@needs_grouped_mm
def test_empty_batch_grouped(monkeypatch):
    layer = MoE(16, 24, 4, 2)
    x = torch.zeros(0, 16)
    out = assert_same(layer, x, monkeypatch)
    assert out.y.shape == (0, 16)


def test_grouped_module_exports():
    assert set(grouped.__all__) >= {"expert_kernel", "choose_kernel", "grouped_mm_available"}
