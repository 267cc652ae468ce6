"""analysis/walltime.py: the longest-first schedule against hand-worked cases and a brute force."""

from __future__ import annotations

import itertools
import random

import pandas as pd
import pytest

from analysis import report, walltime


def best_makespan(durations: list[float], workers: int) -> float:
    """Every assignment of jobs to workers: the optimum LPT approximates (within 4/3)."""
    return min(
        max(
            sum(d for d, w in zip(durations, assign, strict=True) if w == k) for k in range(workers)
        )
        for assign in itertools.product(range(workers), repeat=len(durations))
    )


def test_one_worker_runs_everything_in_turn_and_many_workers_take_the_longest_job():
    jobs = [5.0, 1.0, 3.0, 2.0]
    assert walltime.makespan(jobs, 1) == 11.0
    assert walltime.makespan(jobs, 4) == walltime.makespan(jobs, 16) == 5.0
    assert walltime.makespan([], 2) == 0.0


def test_longest_first_is_graham_s_schedule_not_always_the_best():
    # the textbook case: LPT puts 3, 3 then 2, 2, then the last 2 on a worker at 5 -> 7; best is 6
    jobs = [3.0, 3.0, 2.0, 2.0, 2.0]
    assert walltime.makespan(jobs, 2) == 7.0
    assert best_makespan(jobs, 2) == 6.0


@pytest.mark.parametrize("seed", range(20))
def test_within_four_thirds_of_the_optimum(seed):
    rng = random.Random(seed)
    jobs = [float(rng.randint(1, 20)) for _ in range(rng.randint(1, 7))]
    workers = rng.randint(1, 3)
    best = best_makespan(jobs, workers)
    assert best <= walltime.makespan(jobs, workers) <= best * (4 / 3 - 1 / (3 * workers)) + 1e-9


def test_a_bad_worker_count_names_itself():
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        walltime.makespan([1.0], 0)


def test_tables_from_a_summary():
    summary = pd.DataFrame(
        {
            "sweep": ["lm1b", "lm1b", "balance"],
            "name": ["MoE-4", "MoE-4096-h", "MoE-256_wi0_wl0"],
            "wall_time_s": [600.0, 1200.0, 300.0],
        }
    )
    sweeps = walltime.per_sweep(summary).set_index("sweep")
    assert sweeps.loc["lm1b", "jobs"] == 2 and sweeps.loc["lm1b", "core-min"] == 30.0
    assert sweeps.loc["lm1b", "longest job"] == "MoE-4096-h"
    assert sweeps.loc["balance", "longest (min)"] == 5.0
    proj = walltime.projection(summary, cores=(1, 2, 4)).set_index("cores")["training (min)"]
    assert list(proj) == [35.0, 20.0, 20.0]
    assert walltime.projection(summary.drop(columns="wall_time_s")).empty
    assert walltime.per_sweep(summary.drop(columns="wall_time_s")).empty


def test_the_report_states_the_core_minutes_and_the_projection():
    summary = pd.DataFrame(
        {"sweep": ["lm1b", "lm1b"], "name": ["a", "b"], "wall_time_s": [600.0, 1200.0]}
    )
    text = "\n".join(report._walltime_section(summary))
    assert "2 training jobs, 30 core-minutes in all" in text
    assert "| 1 | 30 |" in text and "| 16 | 20 |" in text
    assert report._walltime_section(summary.drop(columns="wall_time_s")) == []
