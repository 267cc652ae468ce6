"""Which rank owns which expert, and moving slots to their owners and back.

Experts (flat) or groups (hierarchical) are cut into contiguous shards, rank r owning ids
bounds[r] ... bounds[r+1]-1 (sizes differ by at most one; the DistributedSparseDispatcher of
tensor2tensor/utils/expert_utils.py deals them round-robin: the same function, another placement).
Contiguous shards make "sorted by expert" the same as "sorted by destination rank", so one stable
sort lays out the send buffer, and the slots of an expert arrive in rank order, each rank's in its
batch order: the order of the single-process layer's own dispatch. The rows move through the
differentiable gathers of moe_impl/layer/dispatch.py.

Shape suffixes: B = local tokens, N = local slots (B·k), D = d_model, K = slots per token, W = ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moe_impl.layer.dispatch import gather_tokens, permute_rows
from moe_impl.parallel.comm import exchange_counts


def shard_bounds(num_items: int, world_size: int) -> list[int]:
    """Rank r owns items bounds[r] ... bounds[r+1]-1."""
    return [r * num_items // world_size for r in range(world_size + 1)]


class Route(NamedTuple):
    order_N: Tensor  # local slots sorted by destination (stable): the send buffer's order
    inverse_N: Tensor  # position of each slot in the send buffer
    send: list[int]  # rows to each rank
    recv: list[int]  # rows from each rank


def route(target_N: Tensor, bounds: list[int], group=None) -> Route:
    """Sort slots by the expert (or group) they target and agree on split sizes with every rank."""
    target_N = target_N.contiguous()
    order_N = torch.argsort(target_N, stable=True)
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    inner = torch.tensor(bounds[1:-1], dtype=target_N.dtype, device=target_N.device)
    owner_N = torch.bucketize(target_N, inner, right=True)
    send_W = torch.bincount(owner_N, minlength=len(bounds) - 1)
    recv_W = exchange_counts(send_W, group)
    return Route(order_N, inverse_N, send_W.tolist(), recv_W.tolist())


def gather_slots(x_BD: Tensor, r: Route, k: int) -> Tensor:
    """The token row of every slot, in send order, (N, D): x_B[order_N // k]. The backward brings
    the rows back to slot order and sums each token's k slots (a gather and a sum, no index_add)."""
    return gather_tokens(x_BD, r.order_N // k, r.inverse_N, k)


def combine(y_ND: Tensor, r: Route, gate_N: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """y_b = Σ over token b's k slots of gate · (returned row), from rows in send order (Eq. 1)."""
    y_NKD = permute_rows(y_ND, r.inverse_N, r.order_N).view(-1, k, y_ND.shape[-1])
    return (y_NKD * gate_N.view(-1, k, 1).to(y_NKD.dtype)).sum(1).to(dtype)
