"""Gradients under expert parallelism (paper §3.1): replicated parameters' gradients are summed over
ranks; sharded ones (experts, secondary gates) already hold every rank's contribution, delivered by
the all_to_all backward, and stay where they are.

Convention: each rank's loss is its share of the global loss (its tokens' NLL over the *global*
number of scored tokens, plus the replicated balancing loss, comm.replicated_sum), so summed
gradients equal the single-process gradient of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_impl.parallel.comm import timed
from moe_impl.parallel.shard import is_sharded

BUCKET_ELEMENTS = 1 << 24  # 64 MB of float32 per all_reduce


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if not is_sharded(p)]


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if is_sharded(p)]


def sum_replicated_grads(model: nn.Module, group=None) -> None:
    """all_reduce(SUM) of every replicated parameter's gradient, in buckets. A parameter with a
    gradient on some rank gets one on every rank (zeros where it had none, so all ranks reduce the
    same tensors); one with a gradient on no rank keeps none, as in a single process."""
    params = replicated_parameters(model)
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], device=device, dtype=torch.int32)
    with timed("grad_mask_all_reduce", device, reduced=has_grad.numel() * 4):
        dist.all_reduce(has_grad, group=group)
    bucket: list[nn.Parameter] = []
    size = 0
    for p, anywhere in zip(params, has_grad.tolist(), strict=True):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            p.grad = p.grad.to_dense()
        bucket.append(p)
        size += p.numel()
        if size >= BUCKET_ELEMENTS:
            _reduce(bucket, group)
            bucket, size = [], 0
    if bucket:
        _reduce(bucket, group)


def _grad(p: nn.Parameter) -> Tensor:
    """p.grad, which every parameter given to _reduce has (sum_replicated_grads sets it)."""
    assert p.grad is not None
    return p.grad


def _reduce(params: list[nn.Parameter], group) -> None:
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(_grad(p).dtype, []).append(p)
    for same in by_dtype.values():
        flat = torch.cat([_grad(p).reshape(-1) for p in same])
        with timed("grad_all_reduce", flat.device, reduced=flat.numel() * flat.element_size()):
            dist.all_reduce(flat, group=group)
        offset = 0
        for p in same:
            grad = _grad(p)
            grad.copy_(flat[offset : offset + p.numel()].view_as(grad))
            offset += p.numel()


def _sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        values = g._values() if g.is_sparse else g
        total += torch.linalg.vector_norm(values).double().square()
    return total


def global_grad_norm(model: nn.Module, group=None) -> float:
    """‖all gradients of the whole (unsharded) model‖₂, after sum_replicated_grads: the replicated
    part is the same on every rank, the sharded parts are summed over ranks."""
    device = next(model.parameters()).device
    replicated = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    sharded = [p.grad for p in sharded_parameters(model) if p.grad is not None]
    local = _sum_of_squares(sharded, device)
    with timed("norm_all_reduce", device, reduced=8):
        dist.all_reduce(local, group=group)
    total = float(local + _sum_of_squares(replicated, device))
    return math.sqrt(total) if math.isfinite(total) else total
