"""Claim 1 as a number: how fast perplexity falls with the number of experts at equal compute.

The slope b of the least-squares line ln(perplexity) = a + b·ln(experts) over the compute-matched
MoE models of a sweep (Fig. 2-left, Table 7): each doubling of the experts multiplies perplexity
by 2^b. For our runs the models are those of claim 1's rule (evidence.more_experts_data: the lm1b
sweep's MoE models within the ops/timestep band), one point per model at the mean over its seeds;
the interval is a bootstrap over seeds: each replicate draws, for every model, its runs with
replacement and refits. A model with one run contributes that run to every replicate, so with
one seed per model the interval collapses to the point (it then says nothing about noise). The
paper's slope is the same fit over Table 7's MoE models after 10 epochs.

Pure: frames in, numbers out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis import collect
from analysis.rules import COMPUTE_MATCH_TOL

BOOTSTRAP_REPS = 2000
INTERVAL = 0.95
MIN_MODELS = 3  # a line through fewer points says nothing about a trend


class Slope(NamedTuple):
    slope: float  # d ln(perplexity) / d ln(experts)
    low: float  # the bootstrap interval's ends (= slope where every model has one run)
    high: float
    n_models: int
    n_runs: int

    @property
    def per_doubling(self) -> float:
        """The factor on perplexity of twice the experts, 2^slope."""
        return float(2.0**self.slope)

    def describe(self) -> str:
        interval = (
            f", {INTERVAL:.0%} bootstrap interval over seeds [{self.low:+.4f}, {self.high:+.4f}]"
            if self.high > self.low
            else ""
        )
        return (
            f"{self.slope:+.4f} per unit of ln(experts){interval} ({self.n_models} models, "
            f"{self.n_runs} runs; x{self.per_doubling:.3f} perplexity per doubling)"
        )


def compute_matched(runs: pd.DataFrame) -> pd.DataFrame:
    """The MoE runs of one sweep at "equal compute": ops/timestep within ±COMPUTE_MATCH_TOL of
    the sweep's median MoE ops/timestep (Fig. 2-right's larger budgets drop out); claim 1's runs."""
    if runs.empty:
        return runs
    runs = runs[runs["family"].isin(["flat MoE", "hierarchical MoE"])]
    if runs.empty:
        return runs
    ops = runs["ops_per_timestep"]
    return runs[(ops / ops.median() - 1).abs() <= COMPUTE_MATCH_TOL]


def ours(summary: pd.DataFrame, sweep: str = "lm1b") -> Slope | None:
    """The slope of our compute-matched MoE runs of `sweep` (claim 1's)."""
    return runs_slope(compute_matched(collect.sweep(summary, sweep)))


def loglog_slope(experts, perplexity) -> float:
    """Least-squares slope of ln(perplexity) on ln(experts)."""
    x, y = np.log(np.asarray(experts, float)), np.log(np.asarray(perplexity, float))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def runs_slope(
    runs: pd.DataFrame, *, reps: int = BOOTSTRAP_REPS, seed: int = 0, key: str = "model"
) -> Slope | None:
    """The slope over the models of `runs` (one row per run: `key`, num_experts, test_perplexity),
    each model at the mean of its runs, with the bootstrap interval over its runs; None with fewer
    than MIN_MODELS models or fewer than two distinct expert counts."""
    runs = runs.dropna(subset=["num_experts", "test_perplexity"])
    groups = [g for _, g in runs.groupby(key, sort=True)]
    if len(groups) < MIN_MODELS or runs["num_experts"].nunique() < 2:
        return None
    experts = np.array([g["num_experts"].iloc[0] for g in groups], float)
    values = [g["test_perplexity"].to_numpy(float) for g in groups]
    point = loglog_slope(experts, [v.mean() for v in values])
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            loglog_slope(experts, [rng.choice(v, size=v.size).mean() for v in values])
            for _ in range(reps)
        ]
    )
    tail = (1 - INTERVAL) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Slope(point, float(low), float(high), len(groups), len(runs))


def paper_slope(points: pd.DataFrame) -> Slope | None:
    """The same fit on the paper's models (evidence.paper_data's "more_experts": num_experts and
    test_perplexity per model, one printed number each)."""
    return runs_slope(points.assign(model=points["model"]), reps=1)
