"""The grouped expert path without host synchronisation (moe_impl/layer/grouped.py): all experts as
groups, empty ones included, equal to the blocked path (float32, and against a float64 blocked
reference), in one call or in calls of at most MAX_GROUPS groups; traced by torch.compile with
fullgraph=True (a `.tolist()`, `.item()` or `nonzero()` would stop it); on a GPU, run under
torch.cuda.set_sync_debug_mode("error")."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_gates

from moe_impl import HierarchicalMoE, MoE
from moe_impl.layer import grouped
from moe_impl.layer.dispatch import make_plan
from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.grouped import expert_kernel, grouped_expert_mlp, grouped_mm_available

pytestmark = pytest.mark.skipif(
    not grouped_mm_available(), reason="this torch has no torch._grouped_mm"
)
D, H = 8, 16

# slots per expert: (name, counts)
COUNTS = [
    ("all_active", [3, 1, 4, 2, 5, 1]),
    ("some_idle", [3, 0, 4, 0, 0, 6]),
    ("one_gets_all", [0, 0, 0, 9, 0, 0]),
    ("all_idle", [0, 0, 0, 0, 0, 0]),
    ("idle_at_both_ends", [0, 2, 0, 3, 1, 0]),
]


def slots_of(counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """Expert ids of slots with these counts, in a random order."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return expert_N[torch.randperm(expert_N.numel(), generator=generator)]


def bank_run(bank: ExpertBank, x_BD: torch.Tensor, expert_N: torch.Tensor, grouped_plan: bool):
    """E(x) of every slot (k = 1) through a plan of either layout, and the gradients of x and
    of the weights (dense) for a fixed random cotangent."""
    bank.zero_grad(set_to_none=True)
    x = x_BD.detach().clone().requires_grad_(True)
    token_N = torch.arange(expert_N.numel())
    plan = make_plan(expert_N, token_N, bank.w_in.shape[0], grouped=grouped_plan)
    assert plan.grouped == grouped_plan
    y = bank.slot_outputs(x, plan, 1)
    r = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    r = r.to(y.dtype)
    (y * r).sum().backward()
    grads = [x.grad] + [
        torch.zeros_like(p) if p.grad is None else p.grad.to_dense() for p in bank.parameters()
    ]
    return y, grads, [p.grad for p in bank.parameters()]


def make_bank(num_experts: int, sparse: bool) -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(num_experts, D, H, sparse_grad=sparse)


@pytest.mark.parametrize(("name", "counts"), COUNTS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("max_groups", [512, 2])
def test_grouped_equals_blocked_float32(monkeypatch, name, counts, sparse, max_groups):
    """max_groups=2: every product in calls of at most 2 experts (rotated rows when dense, host
    offsets when sparse), as CUDA's group limit splits 513+ experts."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    bank = make_bank(len(counts), sparse)
    g = torch.Generator().manual_seed(1)
    expert_N = slots_of(counts, g)
    x = torch.randn(expert_N.numel(), D, generator=g)
    y_b, grads_b, _ = bank_run(bank, x, expert_N, grouped_plan=False)
    y_g, grads_g, raw_g = bank_run(bank, x, expert_N, grouped_plan=True)
    torch.testing.assert_close(y_g, y_b, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_g, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    active = [e for e, n in enumerate(counts) if n]
    for gw in raw_g:
        if not active:  # no rows: dense zeros or an empty sparse gradient (either layout's way)
            assert gw is None or not gw.to_dense().any()
            continue
        assert gw.is_sparse == sparse
        if sparse:  # sparse over the active experts only, as the blocked path returns it
            assert gw._indices()[0].tolist() == active
        else:  # the idle experts' gradients are exactly 0
            assert not gw[[e for e, n in enumerate(counts) if not n]].any()


@pytest.mark.parametrize(("name", "counts"), COUNTS[:3])
@pytest.mark.parametrize("max_groups", [512, 2])
def test_grouped_float32_close_to_blocked_float64(monkeypatch, name, counts, max_groups):
    """torch._grouped_mm has no float64 kernel: the float32 grouped path against the blocked path
    in float64 on the same weights, to float32's precision."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    bank = make_bank(len(counts), sparse=False)
    g = torch.Generator().manual_seed(2)
    expert_N = slots_of(counts, g)
    x = torch.randn(expert_N.numel(), D, generator=g, dtype=torch.float64)
    y_g, grads_g, _ = bank_run(bank, x.float(), expert_N, grouped_plan=True)
    y_ref, grads_ref, _ = bank_run(bank.double(), x, expert_N, grouped_plan=False)
    torch.testing.assert_close(y_g.double(), y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_g, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_forced_grouped_rejects_float64():
    with expert_kernel("grouped"), pytest.raises(ValueError, match="float64"):
        grouped.choose_kernel(torch.device("cpu"), torch.float64, 8, 16)


def run_layer(layer, x, kernel: str):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with expert_kernel(kernel):
        out = layer(x, generator=torch.Generator().manual_seed(3))
    r = torch.randn(out.y.shape, generator=torch.Generator().manual_seed(4))
    ((out.y * r).sum() + out.aux_loss).backward()
    return out, [x.grad] + [p.grad.to_dense() for p in layer.parameters() if p.grad is not None]


# (layer, tokens, max_groups): experts idle or not, one call or rotated calls of 4 groups
LAYERS = [
    ("flat", 6, 512),
    ("flat", 6, 4),
    ("flat", 40, 4),
    ("hierarchical", 5, 4),
    ("hierarchical", 40, 4),
]


@pytest.mark.parametrize(("kind", "tokens", "max_groups"), LAYERS)
@pytest.mark.parametrize("sparse", [False, True])
def test_layers_grouped_equal_blocked(monkeypatch, kind, tokens, max_groups, sparse):
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    torch.manual_seed(0)
    if kind == "flat":
        layer = MoE(16, 24, 16, 2, sparse_grad=sparse)
    else:
        layer = HierarchicalMoE(16, 24, 4, 4, sparse_grad=sparse)
    randomise_gates(layer)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(5))
    out_b, grads_b = run_layer(layer, x, "blocked")
    out_g, grads_g = run_layer(layer, x, "grouped")
    torch.testing.assert_close(out_g.y, out_b.y, atol=1e-5, rtol=1e-4)
    assert torch.equal(out_g.stats.tokens_per_expert, out_b.stats.tokens_per_expert)
    assert len(grads_g) == len(grads_b)
    for a, b in zip(grads_g, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- no host synchronisation ---------------------------------------------------------------------


def _function_step(x, w_in, w_out, counts):
    return grouped_expert_mlp(x, w_in, w_out, counts, sparse_grad=False)


@pytest.mark.parametrize("max_groups", [512, 2])
def test_dense_path_compiles_as_one_graph(monkeypatch, max_groups):
    """torch.compile(fullgraph=True) raises at any graph break; aot_eager also traces the
    hand-written backward. bf16: the meta kernel of _grouped_mm that tracing uses takes no other."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    counts = torch.tensor([3, 0, 4, 0, 0, 6])
    w_in, w_out, x = (
        torch.randn(shape, generator=g).bfloat16().requires_grad_()
        for shape in [(6, D, H), (6, H, D), (13, D)]
    )
    compiled = torch.compile(_function_step, fullgraph=True, backend="aot_eager")
    outputs = []
    for fn in (compiled, _function_step):
        y = fn(x, w_in, w_out, counts)
        outputs.append([y, *torch.autograd.grad(y.float().sum(), [x, w_in, w_out])])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b)
    assert not outputs[0][2][[1, 3, 4]].any()  # the idle experts' weight gradient
    torch._dynamo.reset()


def test_grouped_plan_compiles_as_one_graph(monkeypatch):
    """Also without torch.bincount, which reads its input's largest value back from a GPU to size
    its output (torch.compile on CPU traces it, so only its absence shows that)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "bincount", None)
    expert_N = torch.tensor([1, 2, 2, 5, 0, 1, 1, 3])
    token_N = torch.arange(8)

    def plan(expert_N, token_N):
        return make_plan(expert_N, token_N, 7, grouped=True)

    got = torch.compile(plan, fullgraph=True, backend="eager")(expert_N, token_N)
    want = plan(expert_N, token_N)
    assert torch.equal(got.counts_E, torch.tensor([1, 3, 2, 1, 0, 1, 0]))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    torch._dynamo.reset()


def test_flat_layer_compiles_as_one_graph():
    """The whole flat layer (dropless, dense gradients) under the grouped kernel and bf16
    autocast, forward and backward (its gate, plan, dispatch, experts, combine and losses)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoE(16, 32, 8, 2)
    x = torch.randn(24, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        return out.y, out.aux_loss

    with expert_kernel("grouped"):
        y, aux = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (y.float().sum() + aux).backward()
    assert layer.experts.w_in.grad is not None
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("max_groups", [512, 2])
def test_no_host_sync_on_cuda(monkeypatch, max_groups):
    """The plan, forward and backward of the dense grouped path with sync debug mode "error":
    any device-to-host read raises."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    device = torch.device("cuda")
    bank = ExpertBank(6, D, H, sparse_grad=False).to(device)
    expert_N = slots_of([3, 0, 4, 0, 0, 6], torch.Generator().manual_seed(8)).to(device)
    token_N = torch.arange(expert_N.numel(), device=device)
    x = torch.randn(expert_N.numel(), D, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plan = make_plan(expert_N, token_N, 6, grouped=True)
            y = bank.slot_outputs(x, plan, 1)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not bank.w_in.grad[[1, 3, 4]].any()
