"""How many steps a run takes, and what a step depends on by its number alone: the learning rate
and the random seeds.

Every step is a pure function of (config, step, parameters): the rate follows App. C.1's schedule
and the dropout, gate-noise and softmax-sample generators are re-seeded from (seed, step) at each
step, so a run resumed from a checkpoint produces exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_impl.train.config import TrainSection


def total_steps(train: TrainSection, corpus) -> int:
    """Steps of a run: train.tokens rounded up to whole steps (at least one), or train.epochs
    passes over a finite corpus."""
    if train.tokens is not None:
        return max(1, -(-train.tokens // train.tokens_per_step))
    return train.epochs * corpus.steps_per_epoch(train.batch_size, train.seq_len)


def lr_factor(step: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak rate at 0-based `step`: linear warmup over `warmup` steps, then
    constant or ∝ 1/√step (App. C.1), continuous at the end of warmup."""
    s = step + 1
    if warmup and s <= warmup:
        return s / warmup
    if schedule == "constant":
        return 1.0
    return math.sqrt(max(warmup, 1) / s)


def step_seeds(seed: int, step: int, rank: int, replicate_noise: bool) -> tuple[int, int]:
    """(dropout seed, gate-noise seed) of `rank` at `step`. The dropout seed (torch's global RNG,
    which CUDA kernels use too) is the rank's own; the gate noise and softmax samples are too, or,
    with distributed.replicate_noise, the same draw on every rank (each keeps its rows)."""
    noise_salt = 2 if replicate_noise else 2 + 2 * rank
    return _seed(seed, step, 1 + 2 * rank), _seed(seed, step, noise_salt)


def _seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)
