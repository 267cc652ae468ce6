"""Gradient accumulation (`train.micro_batches`, issue 28): a step's rows in m equal micro-batches,
one forward and backward each, then one clipping and one optimizer step (loop.py, train_step).

The rules (docs/training.md#micro-batches):

- The step's loss is the unsplit step's: the mean NLL over the step's scored tokens (every rank's)
  plus the balancing loss. Each micro-batch's NLL sum is divided by the step's scored tokens (not
  its own), so the summed gradients are the whole batch's; its balancing loss by m, so the step's
  is the mean of the micro-batches' (m micro-batches of identical rows give the aux loss of one).
- The balancing losses (paper Eq. 6-11) see each micro-batch: Importance and Load are taken over
  the batch one forward pass sees, as over the batch one device sees in the paper's data
  parallelism (Sec. 3.1); the layer needs no change and no state across forward passes.
- The generators are seeded once per step (schedule.step_seeds): micro-batch j's gate noise,
  dropout masks and softmax samples are the draws that follow micro-batch j-1's, so the step stays
  a pure function of (config, step, parameters) and a resumed run repeats it exactly.
- The LSTM state a corpus carries across steps is split by rows like the batch and joined again.
- Routing statistics are those of the step's batch: the micro-batches' tokens per expert,
  Importance, Load and dropped slots summed, the CVs and max/mean load computed on the sums.

With m = 1 nothing is split and every value is the one the unsplit step computed before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from moe_impl.layer.flat import RoutingStats, routing_stats


def check_micro_batches(batch_size: int, micro_batches: int, world_size: int) -> None:
    """ValueError unless each of `world_size` processes can split its rows into `micro_batches`
    equal micro-batches (one process: the config checks it already)."""
    if batch_size % (micro_batches * world_size):
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by train.micro_batches x processes "
            f"({micro_batches} x {world_size} = {micro_batches * world_size}): each process "
            "splits its rows into train.micro_batches equal micro-batches"
        )


def split_rows(tensors: tuple[Tensor, ...], m: int) -> list[tuple[Tensor, ...]]:
    """The m micro-batches of (B, ...) tensors: rows [j·B/m, (j+1)·B/m) each, as views."""
    if m == 1:
        return [tuple(tensors)]
    return list(zip(*(t.chunk(m, dim=0) for t in tensors), strict=True))


def split_state(state: list | None, m: int) -> list:
    """The m micro-batches' LSTM states: each LSTM's (h, c), (layers, B, units), split by rows
    (dim 1) like the batch; None (no state yet) for every micro-batch."""
    if state is None or m == 1:
        return [state] * m
    parts = [[t.chunk(m, dim=1) for t in s] for s in state]  # per LSTM, per tensor: m chunks
    return [[tuple(chunks[j] for chunks in s) for s in parts] for j in range(m)]


def join_state(states: list[list]) -> list:
    """The step's LSTM state, detached, from the micro-batches' (in row order)."""
    if len(states) == 1:
        return [tuple(t.detach() for t in s) for s in states[0]]
    return [
        tuple(torch.cat([st[i][n].detach() for st in states], dim=1) for n in range(len(s)))
        for i, s in enumerate(states[0])
    ]


def combine_stats(stats: list[RoutingStats | None]) -> RoutingStats | None:
    """The step's routing statistics from its micro-batches': counts, Importance, Load and dropped
    slots summed, then the CVs and max/mean load of the sums (flat.routing_stats). Importance and
    the true counts add over rows (Eq. 6), so do the smooth loads of the flat layer (Eq. 10); the
    hierarchical Load (Eq. 14) is the sum of the micro-batches'; the gate entropies are means of the
    summed entropy_sums."""
    if len(stats) == 1 or stats[0] is None:
        return stats[0]
    known = cast(list[RoutingStats], stats)  # a step's micro-batches all have stats or none do
    return routing_stats(
        _sum(s.tokens_per_expert for s in known),
        _sum(s.importance for s in known),
        _sum(s.load for s in known),
        sum(int(s.num_dropped) for s in known),
        None if stats[0].entropy_sums is None else _sum(s.entropy_sums for s in known),
    )


def _sum(tensors: Iterable[Any]) -> Tensor:
    """sum() of tensors, a tensor (typeshed's sum() also allows its start, the int 0)."""
    return sum(tensors)


def coalesce_sparse_grads(model: nn.Module) -> None:
    """Sparse gradients summed over micro-batches may hold an expert several times; coalesced, each
    holds it once, as the gradient norm (optim.clip_gradients) and FactoredAdam assume. Called
    after every micro-batch's backward, not once at the end: autograd adds a pass's sparse
    gradient to the accumulated one with `add_`, which on CUDA concatenates indices and values
    (it merges them only on CPU), so m passes that each touch nearly every expert would hold m
    float32 copies of the expert weights; coalesced after each, the accumulated gradient is at most
    one copy, plus the pass's own and their concatenation while they are added."""
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
