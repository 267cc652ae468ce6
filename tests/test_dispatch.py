"""The block-size cost model of dropless dispatch (moe_impl/layer/dispatch.py, choose_block_size):
hand-worked examples, its documented properties, and make_plan following its choice."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from moe_impl.layer import dispatch
from moe_impl.layer.dispatch import choose_block_size, make_plan


def modelled_costs(counts: list[int]) -> dict[tuple[str, int], int]:
    """Every layout the docstring of choose_block_size lists, with its cost in rows, by plain
    integer arithmetic: ("in place", max count) and ("gathered", C) for C = the max count or a
    smaller power of two."""
    block, gather, dedupe = (
        dispatch.BLOCK_COST_ROWS,
        dispatch.GATHER_COST_ROWS,
        dispatch.DEDUPE_COST_ROWS,
    )
    top = max(counts)
    active = sum(c > 0 for c in counts)
    costs = {("in place", top): len(counts) * (top + block)}
    for size in [top, *(2**j for j in range(top.bit_length()) if 2**j < top)]:
        blocks = sum(-(-c // size) for c in counts)
        split = blocks > active  # some expert spans several blocks: its gradient needs a sum
        costs["gathered", size] = blocks * (size + block + gather) + split * dedupe * active
    return costs


def choice_cost(counts: list[int]) -> int:
    size, in_place = choose_block_size(torch.tensor(counts))
    return modelled_costs(counts)["in place" if in_place else "gathered", size]


def test_hand_worked_examples_assume_these_costs():
    """The examples below were worked out with these constants; retuning them means redoing those."""
    assert (dispatch.BLOCK_COST_ROWS, dispatch.GATHER_COST_ROWS) == (16, 16)
    assert dispatch.DEDUPE_COST_ROWS == 32


# (counts, expected (C, in place)); the arithmetic, with block 16, gather 16, dedupe 32 rows:
HAND_WORKED = [
    # every expert busy and equal: in place 4·(5+16) = 84 < gathered C=5: 4·(5+32) = 148
    ([5, 5, 5, 5], (5, True)),
    # one busy expert among 1024: in place 1024·(3+16) = 19456 > gathered C=3: 1·(3+32) = 35
    ([0] * 1023 + [3], (3, False)),
    # skewed but all active: in place 4·(100+16) = 464 < gathered C=100: 4·132 = 528 (C=64:
    # 5 blocks·96 + 32·4 = 608)
    ([100, 1, 1, 1], (100, True)),
    # one hot expert among 31 light and 32 idle: in place 64·(65+16) = 5184; gathered C=8:
    # (9+31)·(8+32) + 32·32 = 2624 beats C=65: 32·97 = 3104, C=4 and C=16: 2752
    ([65] + [1] * 31 + [0] * 32, (8, False)),
    # all active, heavily skewed: in place 32·(120+16) = 4352; gathered C=8: (15+31)·40 + 32·32
    # = 2864 beats C=16: 39·48 + 1024 = 2896 and C=120: 32·152 = 4864
    ([120] + [1] * 31, (8, False)),
    # a tie goes to the in-place layout (no weight copy): 3·(16+16) = 96 = gathered C=16: 2·48
    ([16, 16, 0], (16, True)),
    # no slot at all (an empty batch): one row per block, no block
    ([0, 0, 0], (1, False)),
    ([], (1, False)),
]


@pytest.mark.parametrize(("counts", "expected"), HAND_WORKED)
def test_hand_worked_examples(counts, expected):
    assert choose_block_size(torch.tensor(counts, dtype=torch.long)) == expected


def random_counts(rng: random.Random) -> list[int]:
    """Counts from balanced to very skewed, with and without idle experts."""
    num_experts = rng.choice([1, 2, 3, 5, 8, 16, 64, 300])
    idle = rng.random() * rng.choice([0.0, 0.5, 0.99])
    scale = rng.choice([1, 4, 30, 200])
    return [
        0 if rng.random() < idle else int(rng.paretovariate(1.2) * scale)
        for _ in range(num_experts)
    ]


def test_choice_is_the_cheapest_modelled_layout():
    rng = random.Random(0)
    for _ in range(300):
        counts = random_counts(rng)
        if max(counts) == 0:
            continue
        costs = modelled_costs(counts)
        assert choice_cost(counts) == min(costs.values()), counts


def test_choice_is_a_valid_layout():
    """In place: C = the largest count. Gathered: C = the largest count or a smaller power of two."""
    rng = random.Random(1)
    for _ in range(300):
        counts = random_counts(rng)
        size, in_place = choose_block_size(torch.tensor(counts))
        top = max(counts)
        if top == 0:
            assert (size, in_place) == (1, False)
        elif in_place:
            assert size == top
        else:
            assert size == top or (size < top and size & (size - 1) == 0), (counts, size)


@pytest.mark.parametrize("num_experts", [1, 2, 5, 9])
@pytest.mark.parametrize("count", [1, 2, 7, 16, 33, 70])
def test_balanced_load_runs_in_place(num_experts, count):
    """Equal counts: every block would be full either way, and in place copies no weights."""
    assert choose_block_size(torch.full((num_experts,), count)) == (count, True)


def test_idle_experts_only_ever_push_towards_gathering():
    """The in-place cost grows with every idle expert, the gathered one ignores them: adding idle
    experts switches in place -> gathered once, never back."""
    active = [7, 3, 12, 1]
    flags = [choose_block_size(torch.tensor(active + [0] * idle))[1] for idle in range(40)]
    assert flags[0] and not flags[-1]
    assert flags == sorted(flags, reverse=True)
    # and once gathered, the blocks (hence C) no longer depend on how many experts are idle
    sizes = {choose_block_size(torch.tensor(active + [0] * idle)) for idle in range(10, 40)}
    assert len(sizes) == 1


def test_more_tokens_on_one_expert_never_costs_less():
    """The modelled cost of the choice is non-decreasing in every count."""
    rng = random.Random(2)
    for _ in range(100):
        counts = random_counts(rng)
        if max(counts) == 0:
            continue
        e = rng.randrange(len(counts))
        costs = []
        for extra in range(0, 40, 3):
            grown = list(counts)
            grown[e] += extra
            costs.append(choice_cost(grown))
        assert all(a <= b for a, b in itertools.pairwise(costs)), (counts, e, costs)


@pytest.mark.parametrize("counts", [c for c, _ in HAND_WORKED if c and max(c)])
def test_make_plan_follows_the_cost_model(counts):
    """make_plan lays the buffer out as chosen: E blocks of C rows in place (no block map), else
    Σ_e ceil(count_e / C) blocks of C rows, each block naming its expert."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    token_N = torch.arange(expert_N.numel())
    plan = make_plan(expert_N, token_N, len(counts))
    size, in_place = choose_block_size(torch.tensor(counts))
    assert plan.block_size == size and (plan.block_expert_L is None) == in_place
    blocks = len(counts) if in_place else sum(-(-c // size) for c in counts)
    assert plan.num_blocks == blocks and plan.slot_of_row_R.numel() == blocks * size
    if not in_place:
        expected = [e for e, c in enumerate(counts) for _ in range(-(-c // size))]
        assert plan.block_expert_L.tolist() == expected


@pytest.mark.parametrize(("num_experts", "tokens"), [(1, 1), (1, 5), (2, 3), (4, 64), (8, 33)])
def test_every_expert_plan_is_make_plans_plan(num_experts, tokens):
    """k = E, dropless: every_expert_plan builds, from the gate's choices alone, the very tensors
    make_plan builds from the sorted slots."""
    torch.manual_seed(num_experts * 100 + tokens)
    top_idx = torch.stack([torch.randperm(num_experts) for _ in range(tokens)])
    token_N = torch.arange(tokens).repeat_interleave(num_experts)
    want = make_plan(top_idx.reshape(-1), token_N, num_experts)
    got = dispatch.every_expert_plan(top_idx)
    assert want.block_expert_L is None and got.block_expert_L is None  # in place, both
    for name in ("block_size", "num_dropped", "grouped", "num_blocks"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("slot_of_row_R", "token_of_row_R", "row_of_slot_N", "counts_E", "kept_E"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_layer_with_k_equal_to_the_experts_routes_as_through_make_plan(monkeypatch):
    """The flat layer with k = num_experts takes every_expert_plan; with it patched back to
    make_plan the output, losses and every gradient are the same bit for bit."""
    from moe_impl import MoE
    from moe_impl.layer import flat

    def run():
        torch.manual_seed(0)
        layer = MoE(8, 12, 4, k=4)
        x = torch.randn(50, 8, requires_grad=True)
        out = layer(x, generator=torch.Generator().manual_seed(1))
        (out.y.square().sum() + out.aux_loss).backward()
        return [out.y, out.aux_loss, x.grad, *(p.grad for p in layer.parameters())]

    calls = []
    real = flat.every_expert_plan
    monkeypatch.setattr(flat, "every_expert_plan", lambda idx: calls.append(1) or real(idx))
    new = run()
    assert calls  # the layer took the k = E plan

    def general(top_idx):
        tokens, k = top_idx.shape
        return make_plan(top_idx.reshape(-1), torch.arange(tokens).repeat_interleave(k), k)

    monkeypatch.setattr(flat, "every_expert_plan", general)
    old = run()
    pairs = zip(new, old, strict=True)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs)
