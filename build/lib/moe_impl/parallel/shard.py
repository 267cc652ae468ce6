"""Sharded parameters: which they are, and moving between sharded and whole state dicts.

A sharded parameter holds rows first ... first + len - 1 (experts, or groups of experts) of a
tensor whose whole first dimension is `total`; every other parameter is replicated on every rank.
`full_state_dict` gathers the whole tensors (for comparison with a single-process model, or for
export); `load_full_state_dict` takes a single-process state dict and keeps this rank's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

_ATTR = "expert_shard"


def mark_sharded(param: nn.Parameter, first: int, total: int) -> None:
    setattr(param, _ATTR, (first, total))


def shard_of(param: Tensor) -> tuple[int, int] | None:
    """(first row, whole rows) of a sharded parameter; None for a replicated one."""
    return getattr(param, _ATTR, None)


def is_sharded(param: Tensor) -> bool:
    return shard_of(param) is not None


def load_full_state_dict(module: nn.Module, full: dict[str, Tensor]) -> None:
    """Load a single-process state dict: sharded parameters take their rows, the rest all of it."""
    params = dict(module.named_parameters())
    local = {}
    for name, value in module.state_dict().items():
        if name not in full:
            raise ValueError(f"the state dict has no entry {name!r}")
        shard = shard_of(params[name]) if name in params else None
        whole = full[name]
        if shard is not None:
            first, total = shard
            if whole.shape[0] != total:
                raise ValueError(
                    f"{name}: the state dict has {whole.shape[0]} rows, the sharded model {total}"
                )
            whole = whole[first : first + value.shape[0]]
        local[name] = whole
    module.load_state_dict(local)


def full_state_dict(module: nn.Module, group=None) -> dict[str, Tensor]:
    """The single-process state dict, sharded parameters gathered from every rank (a collective:
    every rank must call it; every rank gets the whole dict)."""
    params = dict(module.named_parameters())
    out = {}
    for name, value in module.state_dict().items():
        shard = shard_of(params[name]) if name in params else None
        out[name] = value if shard is None else gather_rows(value, shard[1], group)
    return out


def gather_rows(value: Tensor, total: int, group) -> Tensor:
    world = dist.get_world_size(group)
    rows = torch.tensor([value.shape[0]], device=value.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    most = max(int(r) for r in all_rows)
    padded = value.new_zeros((most, *value.shape[1:]))
    padded[: value.shape[0]] = value.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    whole = torch.cat([p[: int(r)] for p, r in zip(parts, all_rows, strict=True)])
    if whole.shape[0] != total:
        raise RuntimeError(f"gathered {whole.shape[0]} rows, expected {total}")
    return whole
