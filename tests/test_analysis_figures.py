"""analysis/fig_*.py (through analysis/figures.py): every figure's panels and series, the seeds'
error bars, and "not run" for a missing sweep."""

from __future__ import annotations

import pandas as pd
import pytest
from analysis_runs import bench_frame, good_runs, make_run, seeded_runs

from analysis import collect, figures, tables


@pytest.fixture(scope="module")
def good() -> collect.Collected:
    return collect.frames(good_runs())


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_figure2_left_and_right_panels(good):
    fig = figures.figure2_left(good.summary)
    paper_ax, ours_ax = fig.axes
    assert _titles(fig)[0].startswith("paper:") and _titles(fig)[1].startswith("this run:")
    assert _labels(paper_ax) == [
        "4xLSTM-512",
        "MoE-1-Wide",
        "MoE-1-Deep",
        "LSTM-2048-512",
        "flat MoE (k=4)",
        "hierarchical MoE (k=2+2)",
    ]
    assert _labels(ours_ax) == [
        "4xLSTM-64",
        "MoE-1-Wide",
        "flat MoE (k=4)",
        "hierarchical MoE (k=2+2)",
    ]
    flat = ours_ax.get_lines()[2]
    assert list(flat.get_ydata()) == [128.0, 120.0, 112.0]
    assert paper_ax.get_xscale() == ours_ax.get_xscale() == "log"
    assert "parameters" in paper_ax.get_xlabel() and "millions" in paper_ax.get_xlabel()
    fig = figures.figure2_right(good.summary)
    assert len(_labels(fig.axes[0])) == 3 and fig.axes[0].get_xscale() == "log"
    assert _labels(fig.axes[1]) == [f"{f} runs" for f in collect.FAMILIES]


def test_budget_models_are_compared_at_their_token_count():
    """Fig. 2-right's budget models train fewer tokens than the rest of the lm1b sweep: every run
    is taken at that count, from its snapshot there (a run without one is left out)."""
    short = make_run("lm1b", "cpu/LSTM-2048-128", 90.0)
    short["summary"].update(train_tokens=2048, steps=4)
    runs = [
        short,
        make_run("lm1b", "cpu/MoE-4096-h", 60.0, early=95.0),  # its snapshot at 2048 tokens
        make_run("lm1b", "cpu/MoE-32", 70.0),  # no snapshot there
        make_run("news100b", "cpu/MoE-32", 50.0, early=80.0),  # another sweep
    ]
    c = collect.frames(runs)
    at, tokens = collect.at_common_tokens(c.summary, c.snapshots, "lm1b")
    assert tokens == 2048
    assert dict(zip(at["model"], at["test_perplexity"], strict=True)) == {
        "LSTM-2048-128": 90.0,
        "MoE-4096-h": 95.0,
    }
    fig = figures.figure2_right(c.summary, c.snapshots)
    assert fig.axes[1].get_ylabel() == "test perplexity after 2,048 tokens"
    # Fig. 2-left is at the sweep's full token count: the budget model is not on it
    ours = figures.figure2_left(c.summary).axes[1]
    assert "LSTM-2048-128" not in _labels(ours)
    full = c.summary.loc[c.summary["sweep"] == "lm1b", "train_tokens"].max()
    assert full > 2048 and ours.get_ylabel() == f"test perplexity after {full:,} tokens"
    # Table 7 says how many tokens each model trained
    t7 = tables.table7(c.summary).set_index("this run's model")
    assert t7.loc["LSTM-2048-128", "training tokens (this run)"] == 2048


def test_figure3_panels_and_gap(good):
    fig = figures.figure3(good.summary, good.snapshots)
    assert len(fig.axes) == 4
    assert [t.split(":")[0] for t in _titles(fig)] == ["paper", "this run", "", ""]
    top = fig.axes[0].get_lines()
    assert len(top[0].get_xdata()) == 8 and len(top[1].get_xdata()) == 8  # Table 8's models
    ours_gap = fig.axes[3].get_lines()[0].get_ydata()
    assert list(ours_gap) == [25.0, 25.0, 26.0, 29.0, 30.0, 31.0]
    assert "seeds" not in _titles(fig)[1]  # one run per model: no bars
    assert any("N" in lab for lab in _labels(fig.axes[1]))


def test_table6_balance_panels(good):
    fig = figures.table6_balance(good.summary, good.loads)
    assert len(fig.axes) == 6
    assert _labels(fig.axes[0]) == ["CV(Importance)", "CV(Load)", "max(Load)/mean(Load)"]
    assert len(fig.axes[0].patches) == 3 * 6 and len(fig.axes[1].patches) == 3 * 3
    hist_labels = _labels(fig.axes[2])
    assert hist_labels[0].startswith("w = 0 / 0") and hist_labels[1].startswith("w = 0.1 / 0.1")


def test_perf_scaling_panels_and_peer_points():
    fig = figures.perf_scaling(bench_frame())
    assert len(fig.axes) == 4
    assert "fixed tokens per step" in fig.axes[0].get_title()
    assert "1 configuration(s) skipped" in fig.axes[1].get_title()
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    published = {"ref (peers.csv, published)", "davidmrau (peers.csv, published)"}
    assert {"flat MoE", "hierarchical MoE", *published} <= labels
    ref = next(
        ln for ln in fig.axes[0].get_lines() if ln.get_label() == "ref (peers.csv, published)"
    )
    assert list(ref.get_ydata()) == [14.1, 12.4]  # peers.csv's n=4 and n=32 rows (T=4096)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"


def test_perf_scaling_draws_the_peers_measured_in_the_run_apart_from_ours():
    ours = bench_frame()
    fixed = ours[ours["tokens_mode"] == "fixed_tokens"]
    peer = fixed.assign(implementation="st-moe-pytorch", moe_us_per_token=99.0, ratio_median=9.0)
    both = pd.concat([ours.assign(implementation="moe_impl"), peer], ignore_index=True)
    split_ours, split_peers = collect.split_bench(both)
    assert len(split_ours) == len(ours) and set(split_peers["implementation"]) == {"st-moe-pytorch"}
    fig = figures.perf_scaling(both)
    lines = {ln.get_label(): ln for ln in fig.axes[2].get_lines()}  # ratio panel, fixed tokens
    ok_flat = peer[(peer["kind"] == "flat") & (peer["status"] == "ok")]
    run_line = lines["st-moe-pytorch (this run)"]
    assert list(run_line.get_ydata()) == [9.0] * len(ok_flat)
    flat_ours = lines["flat MoE"]  # ours alone: the peer's rows do not join our line
    assert 9.0 not in list(flat_ours.get_ydata())
    eff = figures.efficiency(pd.DataFrame(), both)  # the efficiency figure counts our rows only
    assert eff is not None


def test_match_peers_requires_the_same_configuration():
    bench = bench_frame()
    m = collect.match_peers(bench)
    assert set(m["implementation"]) == {"ref", "davidmrau", "ref_hier"}
    assert collect.match_peers(bench.assign(threads=2)).empty
    assert collect.match_peers(bench.assign(device="cuda")).empty


def test_efficiency_panels(good):
    fig = figures.efficiency(good.summary, bench_frame())
    assert _titles(fig)[0].startswith("paper:") and _titles(fig)[1].startswith("this run:")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert "paper Table 8: hierarchical MoE" in labels and "this run lm1b: flat MoE" in labels
    assert fig.axes[2].get_ylabel().startswith("MFU")


def test_figures_say_not_run_for_missing_sweeps(good):
    only_lm1b = good.summary[good.summary["sweep"] == "lm1b"]
    for fig in (
        figures.figure3(only_lm1b, good.snapshots),
        figures.table6_balance(only_lm1b, good.loads.iloc[0:0]),
        figures.perf_scaling(pd.DataFrame()),
    ):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("not run") for t in texts)


def test_seeds_draw_min_max_bars():
    """Two seeds per model: the figures draw the mean with min-max bars over the seeds."""
    seeded = seeded_runs("lm1b", {"MoE-4": (120, 125), "MoE-32": (122, 127), "MoE-256": (100, 104)})
    c = collect.frames(seeded)
    fig = figures.figure2_left(c.summary)
    assert report_bars(fig.axes[1]) == 1  # one family with bars
    assert "min–max over seeds" in fig.axes[1].get_legend().get_title().get_text()
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [122.5, 124.5, 102.0]  # the means
    fig = figures.figure2_right(c.summary)
    assert report_bars(fig.axes[1]) == 1 and "min–max over seeds" in _titles(fig)[1]
    news = seeded_runs(
        "news100b",
        {
            "MoE-32": ((56.0, 81.0), (57.0, 82.0)),
            "MoE-256-h": ((52.0, 78.0), (53.0, 80.0)),
            "MoE-1024-h": ((50.0, 78.0),),
        },
    )
    c = collect.frames(news)
    fig = figures.figure3(c.summary, c.snapshots)
    assert "min–max over seeds" in _titles(fig)[1]
    assert report_bars(fig.axes[1]) == 2 and report_bars(fig.axes[3]) == 1
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [25.0, 26.5, 28.0]


def report_bars(ax) -> int:
    """The error-bar containers drawn on ax."""
    return sum(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)
