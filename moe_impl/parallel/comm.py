"""Differentiable collectives for expert parallelism, and a meter of what they move.

Two autograd functions carry everything the expert-parallel layers exchange:

- `exchange(tensors, send_splits, recv_splits)`: an all_to_all with variable split sizes (the
  dropless dispatch of paper §3.1 / tensor2tensor's 2017 DistributedSparseDispatcher in tensor2tensor/utils/expert_utils.py) of
  several row-aligned tensors at once; its backward sends the gradients back along the same routes.
  The tensors go in one fixed order inside one autograd node, so every rank runs the backward
  collectives in the same order.
- `replicated_sum(x)`: all_reduce(SUM) forward, identity backward. Its result feeds a loss that every
  rank computes identically (the balancing losses over the global batch, as tensor2tensor's 2017 code sums them); each rank's
  gradient then flows only into its own contribution, and summing the replicated parameters'
  gradients over ranks (sync.py) counts the loss exactly once.

`meter()` records bytes sent and wall time spent in these collectives (device-synchronised on CUDA),
for `python -m moe_impl bench --distributed`.

Shape suffixes: N = rows sent, M = rows received, W = ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommMeter:
    """Totals of the collectives run while the meter is active (forward and backward)."""

    calls: int = 0
    bytes_sent: int = 0  # all_to_all rows this rank sent to *other* ranks (its own stay local)
    bytes_received: int = 0
    bytes_reduced: int = 0  # size of the tensors this rank all-reduced (gradients, loss sums)
    seconds: float = 0.0
    by_kind: dict = field(default_factory=dict)  # kind -> seconds

    def add(self, kind: str, sent: int, received: int, reduced: int, seconds: float) -> None:
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_received += received
        self.bytes_reduced += reduced
        self.seconds += seconds
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + seconds


_ACTIVE: list[CommMeter] = []


@contextlib.contextmanager
def meter() -> Iterator[CommMeter]:
    """`with meter() as m:` collects the traffic of every collective of this module inside it."""
    m = CommMeter()
    _ACTIVE.append(m)
    try:
        yield m
    finally:
        _ACTIVE.remove(m)


@contextlib.contextmanager
def timed(
    kind: str, device: torch.device, sent: int = 0, received: int = 0, reduced: int = 0
) -> Iterator[None]:
    """Time a collective for the active meters (a no-op without one)."""
    if not _ACTIVE:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for m in _ACTIVE:
        m.add(kind, sent, received, reduced, time.perf_counter() - t0)


def rank_and_size(group=None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "expert parallelism needs torch.distributed: call torch.distributed.init_process_group "
            "(or moe_impl.parallel.init_from_env under torchrun) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def exchange_counts(send_W: Tensor, group=None) -> Tensor:
    """Each rank's count for every rank -> every rank's count for this rank (int64, (W,))."""
    recv_W = torch.empty_like(send_W)
    with timed("counts", send_W.device):
        dist.all_to_all_single(recv_W, send_W.contiguous(), group=group)
    return recv_W


def all_gather_sizes(size: int, device: torch.device, group=None) -> list[int]:
    """Every rank's `size` (e.g. its number of tokens), in rank order."""
    _, world = rank_and_size(group)
    out = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    with timed("sizes", device):
        dist.all_gather(out, torch.tensor(size, dtype=torch.long, device=device), group=group)
    return [int(t) for t in out]


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group, kind: str) -> Tensor:
    rank, _ = rank_and_size(group)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    sent = (sum(send) - send[rank]) * row_bytes
    received = (sum(recv) - recv[rank]) * row_bytes
    with timed(kind, x.device, sent, received):
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send, recv, group, *tensors):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = tuple(_all_to_all(t, send, recv, group, "all_to_all") for t in tensors)
        ctx.mark_non_differentiable(*[t for t in out if not t.is_floating_point()])
        return out

    @staticmethod
    def backward(ctx, *grads):
        back = tuple(
            _all_to_all(g, ctx.recv, ctx.send, ctx.group, "all_to_all")
            if ctx.needs_input_grad[3 + i]
            else None
            for i, g in enumerate(grads)
        )
        return (None, None, None, *back)


def exchange(
    tensors: Sequence[Tensor], send_splits: list[int], recv_splits: list[int], group=None
) -> tuple[Tensor, ...]:
    """all_to_all of row-aligned tensors: rows [Σ send[:j], Σ send[:j+1]) go to rank j; the result
    holds the rows from rank 0, then rank 1, ... (`recv_splits` of them). Integer tensors travel
    without gradient; floating ones are differentiable."""
    return _Exchange.apply(send_splits, recv_splits, group, *tensors)


class _ReplicatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        with timed("all_reduce", x.device, reduced=out.numel() * out.element_size()):
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def replicated_sum(x: Tensor, group=None) -> Tensor:
    """Σ over ranks of x, with an identity backward. Correct only when everything computed from the
    result is computed identically on every rank (a replicated loss): each rank's gradient then
    flows into its own contribution exactly once."""
    return _ReplicatedSum.apply(x, group)
