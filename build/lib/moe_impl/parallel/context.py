"""What a training process knows about its place in a distributed run (rank, world size), and the
few host-side collectives the training loop needs (barrier, sums of floats)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_impl.parallel.launch import env_world_size, init_from_env


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # this process created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Σ over ranks of each value (float64); the values themselves on one process."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float, device: torch.device) -> float:
        """The largest value over ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def all_agree(self, ok: bool, device: torch.device) -> bool:
        """True on every rank iff `ok` on every rank (so all ranks stop together)."""
        return self.sum([0.0 if ok else 1.0], device)[0] == 0.0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(backend: str, device_type: str, timeout_s: float) -> Context:
    """The context of this process: the process group already initialised (spawned tests), the one
    torchrun describes (WORLD_SIZE > 1), or a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Context(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    if env_world_size() > 1:
        info = init_from_env(backend, device_type, timeout_s)
        return Context(info.rank, info.world_size, info.local_rank, info.backend, owns_group=True)
    return Context()
