"""Claim 1 as a number (analysis/slope.py): the least-squares slope of ln(perplexity) on
ln(experts) at equal compute, against closed forms and numpy's polyfit, its bootstrap interval over
seeds, the paper's Table 7 value, and where it is written (REPORT.md's claim 1 section, Fig.
2-left's panels). Unit tier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from analysis_runs import good_runs

from analysis import collect, report, slope
from analysis.fig_figure2_left import figure2_left


def runs(points: dict[int, list[float]]) -> pd.DataFrame:
    """One row per run: model MoE-<n>, its expert count and test perplexity."""
    rows = [
        {"model": f"MoE-{n}", "num_experts": n, "test_perplexity": p}
        for n, ppls in points.items()
        for p in ppls
    ]
    return pd.DataFrame(rows)


def test_a_power_law_gives_its_exponent():
    experts = [4, 32, 256, 1024, 4096]
    assert slope.loglog_slope(experts, [50 * n**-0.07 for n in experts]) == pytest.approx(-0.07)
    noisy = [45.0, 39.7, 35.7, 34.6, 34.1]
    want = np.polyfit(np.log(experts), np.log(noisy), 1)[0]
    assert slope.loglog_slope(experts, noisy) == pytest.approx(want)


def test_one_run_per_model_has_no_interval():
    fit = slope.runs_slope(runs({4: [10.0], 32: [8.0], 256: [6.5]}))
    assert fit.low == fit.high == fit.slope and (fit.n_models, fit.n_runs) == (3, 3)
    assert "bootstrap" not in fit.describe()
    assert fit.per_doubling == pytest.approx(2**fit.slope)


def test_seeds_give_an_interval_around_the_mean_fit():
    data = {4: [9.9, 10.1], 32: [7.9, 8.2], 256: [6.4, 6.6], 4096: [5.4, 5.6]}
    fit = slope.runs_slope(runs(data), reps=500, seed=1)
    means = {n: np.mean(v) for n, v in data.items()}
    assert fit.slope == pytest.approx(slope.loglog_slope(list(means), list(means.values())))
    assert fit.low < fit.slope < fit.high and fit.n_runs == 8
    again = slope.runs_slope(runs(data), reps=500, seed=1)
    assert (again.low, again.high) == (fit.low, fit.high)  # seeded: the report is reproducible


def test_too_few_models_give_no_slope():
    assert slope.runs_slope(runs({4: [10.0], 32: [8.0]})) is None
    assert slope.runs_slope(runs({4: [10.0, 9.0, 9.5]})) is None


def test_the_papers_slope_is_table_7s_least_squares():
    points = report.paper_data()["more_experts"]
    fit = slope.paper_slope(points)
    want = np.polyfit(np.log(points["num_experts"]), np.log(points["test_perplexity"]), 1)[0]
    assert fit.slope == pytest.approx(want) and fit.n_models == 6
    assert fit.slope == pytest.approx(-0.0413, abs=5e-5)  # 45.0 (4) ... 34.1 (4096 experts)


def test_the_report_and_figure_2_left_give_both_slopes():
    summary = collect.frames(good_runs()).summary
    text = report.render(report.verdicts(summary, pd.DataFrame()), summary)
    claim1 = text.split("## 1. ")[1].split("## 2. ")[0]
    assert "Slope of ln(perplexity) against ln(experts)" in claim1
    assert "the paper (Table 7, after 10 epochs) -0.0413" in claim1
    fig = figure2_left(summary)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts if "slope" in t.get_text()]
    assert len(notes) == 2 and notes[0].endswith("-0.041")
