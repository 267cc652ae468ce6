"""The device a run trains on: which one (`resolve_device`), its autocast, and what the summary
reports of it (`device_name`, `peak_memory_mb`)."""

from __future__ import annotations

import os
import resource
from contextlib import AbstractContextManager, nullcontext

import torch

from moe_impl.runs import runinfo


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The configured device; a bare 'cuda' in a distributed run is the process's own GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={name!r} but torch sees no CUDA device ({no_cuda_reason()}); train "
            "where a GPU is, or set train.device=cpu"
        )
    if device.type == "cuda" and device.index is not None and local_rank is not None:
        raise ValueError(
            f"train.device={name!r} names one GPU, but each process of a distributed run takes "
            "its own (LOCAL_RANK): set train.device=cuda"
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def no_cuda_reason() -> str:
    """Why torch has no CUDA device here, in a few words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU{where}"


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """train.dtype: bfloat16 autocast (the routing keeps float32 inside), or nothing."""
    return (
        torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    )


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak: allocated GPU memory, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count."""
    name = runinfo.device_name(str(device))
    return name if device.type == "cuda" else f"{name} ({os.cpu_count()} cores)"
