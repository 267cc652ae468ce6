"""What the reproduction's training jobs cost, and what they would take on more cores.

Each training job is one process on `threads_per_run` cores (one in the default config), so a
machine with c cores runs c of them at once. From the measured wall time of every job
(`summary.csv`'s `wall_time_s`), the projection schedules them longest first onto c workers
(Graham's LPT rule, within 4/3 of the best possible schedule) and reports when the last one ends.
It leaves out the memory budget (on a 24 GB machine the default's jobs all fit in pairs, and
workflow/resources/peak_memory.yaml says what each needs) and the non-training jobs (benchmark,
collect, figures), and Snakemake does not start jobs longest first, so a real run can take longer.
"""

from __future__ import annotations

import heapq

import pandas as pd

CORES = (1, 2, 4, 8, 16)


def makespan(durations: list[float], workers: int) -> float:
    """When the last job ends if each idle worker takes the longest job still waiting."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ends = [0.0] * min(workers, max(len(durations), 1))
    for d in sorted(durations, reverse=True):
        heapq.heappush(ends, heapq.heappop(ends) + d)
    return max(ends)


def job_times(summary: pd.DataFrame) -> pd.Series:
    """Wall time (s) of every training job that recorded one, indexed by `sweep/run`."""
    if "wall_time_s" not in summary:
        return pd.Series(dtype=float)
    t = summary.dropna(subset=["wall_time_s"])
    return pd.Series(
        t["wall_time_s"].astype(float).to_numpy(), index=t["sweep"] + "/" + t["name"], name="s"
    )


def per_sweep(summary: pd.DataFrame) -> pd.DataFrame:
    """Per sweep: jobs, core-minutes, and its longest job (minutes)."""
    times = job_times(summary)
    if times.empty:
        return pd.DataFrame(columns=["sweep", "jobs", "core-min", "longest job", "longest (min)"])
    sweep = times.index.str.split("/").str[0]
    g = times.groupby(sweep)
    out = pd.DataFrame(
        {
            "jobs": g.size(),
            "core-min": g.sum() / 60,
            "longest job": g.apply(lambda s: s.idxmax().split("/", 1)[1]),
            "longest (min)": g.max() / 60,
        }
    )
    out.index.name = "sweep"
    return out.reset_index()


def projection(summary: pd.DataFrame, cores: tuple[int, ...] = CORES) -> pd.DataFrame:
    """Minutes until every training job has ended, on each number of single-thread workers."""
    times = list(job_times(summary))
    rows = [{"cores": c, "training (min)": makespan(times, c) / 60} for c in cores] if times else []
    return pd.DataFrame(rows, columns=["cores", "training (min)"])
