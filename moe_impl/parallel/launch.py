"""Starting process groups: under torchrun / SLURM (`init_from_env`), or W local processes spawned
by this process (`spawn`, CPU gloo: the tests and `bench --distributed` on one machine)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def under_launcher() -> bool:
    """Whether torchrun (torch.distributed.run) started this process, even as its only rank: it
    sets TORCHELASTIC_RUN_ID, as well as WORLD_SIZE, RANK and LOCAL_RANK."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def resolve_backend(backend: str, device_type: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"distributed.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("distributed.backend='nccl' needs train.device=cuda; use gloo on CPU")
    if backend == "gloo" and device_type == "cuda":
        raise ValueError(
            "distributed.backend='gloo' cannot all_to_all CUDA tensors; use nccl (or auto) on GPUs"
        )
    return backend


def init_from_env(backend: str, device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    a no-op when it is already initialised."""
    backend = resolve_backend(backend, device_type)
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"distributed training needs torchrun's environment; {', '.join(missing)} not set "
            "(launch with `torchrun --nproc_per_node N -m moe_impl train ...`)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def _worker(rank, world_size, init_file, backend, threads, fn, args, results) -> None:
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            # plain pickle: tensors travel by value, not as shared memory that dies with the worker
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))


def _is_peer_error(tb: str) -> bool:
    return "Connection closed by peer" in tb or "Connection reset by peer" in tb


def spawn(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    threads: int = 1,
) -> list:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined in one process group;
    returns their results in rank order. `fn` must be importable (a module-level function) and its
    result picklable. A failing rank raises RuntimeError with its traceback; a run longer than
    `timeout_s` is killed (RuntimeError)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = Path(tmp) / "rendezvous"
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, str(init_file), backend, threads, fn, args, results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}  # rank -> fn's result
        errors: list[tuple[bool, int, str]] = []  # (a peer's error, rank, traceback)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        try:
            while len(out) + len(errors) < world_size:
                left = (deadline - datetime.datetime.now()).total_seconds()
                try:
                    rank, ok, value = results.get(timeout=max(left, 0.01))
                except queue.Empty:
                    if errors:  # the others are blocked in a collective: report what failed
                        break
                    raise RuntimeError(
                        f"distributed run of {fn.__name__} did not finish in {timeout_s:.0f} s"
                    ) from None
                if ok:
                    out[rank] = pickle.loads(value)
                else:
                    errors.append((_is_peer_error(value), rank, value))
                    # give the others a few seconds to report the failure that caused this one
                    deadline = min(
                        deadline, datetime.datetime.now() + datetime.timedelta(seconds=5)
                    )
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        errors.sort()  # a rank's own error before its peers' "connection closed"
        raise RuntimeError(
            "distributed worker failed\n" + "\n".join(f"rank {r}:\n{tb}" for _, r, tb in errors)
        )
    return [out[r] for r in range(world_size)]
