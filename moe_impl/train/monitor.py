"""What a run reports besides its run directory: an MLflow run (rank 0; moe_impl.tracking) and,
on a GPU, NVML samples (moe_impl.telemetry)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_impl import telemetry
from moe_impl.runs import runinfo
from moe_impl.train.config import RunConfig


def start_tracker(cfg: RunConfig, run_dir: Path, name: str, tags: dict, *, is_main: bool):
    """The run's MLflow tracker (moe_impl.tracking.RunTracker), or None: tracking off, or not
    rank 0 (rank 0 alone logs)."""
    if not cfg.tracking.enabled or not is_main:
        return None
    from moe_impl.tracking import RunTracker  # mlflow is imported only in moe_impl.tracking

    config = cfg.to_dict()
    return RunTracker.start(
        run_dir,
        config=config,
        experiment=cfg.experiment,
        run_name=name,
        tags={**tags, **runinfo.config_tags(config)},
        tracking_uri=cfg.tracking.uri,
    )


def start_sampler(cfg: RunConfig, device: torch.device, *, is_main: bool):
    """A started GpuSampler of the run's GPU (rank 0), or None."""
    if device.type != "cuda" or not is_main:
        return None
    index = device.index if device.index is not None else 0
    return telemetry.GpuSampler(cfg.telemetry.interval_s, index).start()
