"""The claims' rules (analysis/rules.py) on small frames: each rule returns every status it has,
with its statistic, band, n and the rows it used; the seed spread is pooled as documented, a change
within the noise band does not count and one beyond it does, every rule still holds on the paper's
own numbers, and report.py words each result (`said`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import collect, evidence, report, rules

R, NR, NT, NRUN = rules.REPRODUCED, rules.NOT_REPRODUCED, rules.NOT_TESTABLE, rules.NOT_RUN
NO_SPREAD = rules.Spread()


def said(result: rules.Result) -> report.Words:
    """A rule's result as REPORT.md words it."""
    return report.words(result)


def spread(sd: float, n_models: int = 4, log: bool = True) -> rules.Spread:
    return rules.Spread(sd, n_models, 2, 2, log)


def models(ppl: dict[int, float], n_runs: int = 1, **cols) -> pd.DataFrame:
    """One row per model: num_experts -> test perplexity."""
    return pd.DataFrame(
        {"num_experts": list(ppl), "test_perplexity": list(ppl.values()), "n_runs": n_runs, **cols}
    )


# --- the seed spread ---------------------------------------------------------------------------


def test_pooled_spread_is_the_df_weighted_sd_of_log_perplexity():
    runs = pd.DataFrame(
        {
            "model": ["A", "A", "B", "B", "B", "C"],
            "test_perplexity": [10.0, 11.0, 20.0, 22.0, 21.0, 30.0],
        }
    )
    a, b = np.log([10.0, 11.0]), np.log([20.0, 22.0, 21.0])
    var_a = ((a - a.mean()) ** 2).sum() / 1  # ddof = 1
    var_b = ((b - b.mean()) ** 2).sum() / 2
    expected = math.sqrt((1 * var_a + 2 * var_b) / (1 + 2))  # C (one run) adds nothing
    s = rules.pooled_spread(runs)
    assert s.sd == pytest.approx(expected)
    assert (s.n_models, s.fewest, s.most) == (2, 2, 3)
    assert (
        report.spread_text(s)
        == f"seed-to-seed SD {expected:.1%} (pooled over 2 models, 2-3 seeds each)"
    )
    gap = rules.pooled_spread(runs, log=False, what="of the gap")
    var_a, var_b = 0.5, 1.0  # (10, 11) and (20, 22, 21), unlogged
    assert gap.sd == pytest.approx(math.sqrt((var_a + 2 * var_b) / 3))
    assert report.spread_text(gap).startswith("seed-to-seed SD of the gap 0.913 ")


def test_one_seed_per_model_measures_no_spread():
    runs = pd.DataFrame({"model": ["A", "B"], "test_perplexity": [10.0, 20.0]})
    s = rules.pooled_spread(runs)
    assert not s.measured and report.spread_text(s) == report.ONE_SEED
    assert not rules.pooled_spread(runs.iloc[0:0]).measured


def test_per_model_adds_the_seed_range():
    runs = pd.DataFrame(
        {
            "family": "flat MoE",
            "model": ["A", "A", "B"],
            "paper_model": ["A", "A", "B"],
            "moe": "flat",
            "num_experts": [4, 4, 32],
            "test_perplexity": [10.0, 12.0, 20.0],
        }
    )
    m = collect.per_model(runs, ["test_perplexity"], spread=["test_perplexity"])
    a, b = m.iloc[0], m.iloc[1]
    assert (a.test_perplexity, a.n_runs, a.test_perplexity_min, a.test_perplexity_max) == (
        11.0,
        2,
        10.0,
        12.0,
    )
    assert a.test_perplexity_sd == pytest.approx(math.sqrt(2)) and math.isnan(b.test_perplexity_sd)


# --- claim 1: more experts -----------------------------------------------------------------------


def test_more_experts_states():
    assert rules.rule_more_experts(models({4: 120, 32: 110, 256: 100})).status == R
    assert rules.rule_more_experts(models({4: 100, 32: 110})).status == NR
    assert rules.rule_more_experts(models({4: 100})).status == NRUN


def test_a_rise_within_the_band_does_not_count_and_one_beyond_it_does():
    """SD 2% with 2 seeds a model: SE of a difference 2%, band 4%."""
    within = models({4: 120, 32: 123.6, 256: 100}, n_runs=2)  # +3%
    beyond = models({4: 120, 32: 126, 256: 100}, n_runs=2)  # +5%
    o = rules.rule_more_experts(within, spread(0.02))
    assert o.status == R and "band 4.0% = max(1%, 2·SE 4.0%)" in said(o).reason
    o = rules.rule_more_experts(beyond, spread(0.02))
    assert (
        o.status == NR
        and "32→256" not in said(o).reason
        and "4→32 experts: +5.0%" in said(o).reason
    )
    # the band also tightens the improvement: -3% overall is within a 4% band
    assert rules.rule_more_experts(models({4: 100, 256: 97}, 2), spread(0.02)).status == NR
    # one seed per model: the 1% band, and the reason says why
    o = rules.rule_more_experts(models({4: 120, 32: 123.6, 256: 100}))
    assert (
        o.status == NR and "band 1% (one seed per model: no seed spread measured)" in said(o).reason
    )


def test_the_band_widens_with_fewer_seeds():
    """The fewest seeds among the compared counts set n: SE = SD·sqrt(2/n)."""
    df = models({4: 120, 32: 123.6, 256: 100}, n_runs=2).assign(n_runs=[2, 1, 2])
    o = rules.rule_more_experts(df, spread(0.02))
    assert f"2·SE {2 * 0.02 * math.sqrt(2):.1%}" in said(o).reason


# --- claim 2: hierarchical vs flat ---------------------------------------------------------------


def pairs(flat: float, hier: float, n: int = 1) -> pd.DataFrame:
    return pd.DataFrame(
        {"sweep": ["lm1b"], "num_experts": [256], "flat": [flat], "hierarchical": [hier]}
    ).assign(n_flat=n, n_hier=n)


def test_hier_flat_states():
    assert rules.rule_hier_flat(pairs(100, 102)).status == R
    o = rules.rule_hier_flat(pairs(100, 104))
    assert (
        o.status == NR and "plain ±3% rule" in said(o).reason and report.ONE_SEED in said(o).reason
    )
    # 2 seeds each, SD 1%: 2·SE = 2%, resolves 3%
    assert rules.rule_hier_flat(pairs(100, 102, 2), {"lm1b": spread(0.01)}).status == R
    assert rules.rule_hier_flat(pairs(100, 104, 2), {"lm1b": spread(0.01)}).status == NR
    # SD 2%: 2·SE = 4% > 3%: not testable, whatever the difference
    for hier in (100.5, 104):
        o = rules.rule_hier_flat(pairs(100, hier, 2), {"lm1b": spread(0.02)})
        assert o.status == NT and "cannot resolve 3%" in said(o).why and "2·SE 4.0%" in said(o).why
    assert rules.rule_hier_flat(pairs(100, 100).iloc[0:0]).status == NRUN


# --- claim 3: the gap ----------------------------------------------------------------------------

UNIGRAM, FLOOR = 400.0, math.log(20.0)  # half the unigram's excess: ln(20)/2 nats -> N ppl <= 89


def gaps(gap: list[float], early: float = 80.0, n_runs: int = 1) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "params": [1e5, 1e6, 1e7, 1e8][: len(gap)],
            "gap": gap,
            "early_perplexity": early,
            "n_runs": n_runs,
        }
    )


def test_gap_states():
    corpus = {"unigram_perplexity": UNIGRAM, "floor_nll": FLOOR}
    o = rules.rule_gap(gaps([20, 22, 25]), **corpus)
    assert o.status == R and "unigram perplexity 400" in said(o).reason
    assert rules.rule_gap(gaps([25, 22, 20]), **corpus).status == NR
    o = rules.rule_gap(gaps([20, 22, 25], early=150.0), **corpus)
    assert o.status == NT and "unigram stage" in said(o).why and "unigram 400" in said(o).why
    o = rules.rule_gap(gaps([20, 22, 25]))
    assert o.status == NT and said(o).why == "the corpus's unigram perplexity is unknown"
    assert rules.rule_gap(gaps([20, 22]), **corpus).status == NRUN


def test_gap_widened_by_a_large_model_that_only_catches_up_does_not_count():
    """The gap widens with capacity, but the largest model ends behind the smallest at 10N: it
    started further behind, it did not use the data better."""
    corpus = {"unigram_perplexity": UNIGRAM, "floor_nll": FLOOR}
    ahead = gaps([20, 22, 25]).assign(early_perplexity=[60.0, 61.0, 62.0])
    ahead["late_perplexity"] = ahead["early_perplexity"] - ahead["gap"]  # 40, 39, 37
    o = rules.rule_gap(ahead, **corpus)
    assert o.status == R and "the largest model 37 vs the smallest 40" in said(o).reason
    behind = ahead.assign(early_perplexity=[60.0, 64.0, 70.0])
    behind["late_perplexity"] = behind["early_perplexity"] - behind["gap"]  # 40, 42, 45
    o = rules.rule_gap(behind, **corpus)
    assert o.status == NR and "(behind)" in said(o).reason


def test_gap_trivial_stage_boundary_and_unknown_floor():
    limit = math.exp(FLOOR + 0.5 * (math.log(UNIGRAM) - FLOOR))  # ~89.4
    corpus = {"unigram_perplexity": UNIGRAM, "floor_nll": FLOOR}
    assert rules.rule_gap(gaps([20, 22, 25], early=limit * 0.99), **corpus).status == R
    assert rules.rule_gap(gaps([20, 22, 25], early=limit * 1.01), **corpus).status == NT
    # no floor known: 0 nats, a stricter check (ln 80 > ln(400) / 2)
    o = rules.rule_gap(gaps([20, 22, 25]), unigram_perplexity=UNIGRAM)
    assert o.status == NT and "taken as 0 nats" in said(o).reason
    assert rules.rule_gap(gaps([20, 22, 25], early=19.0), unigram_perplexity=UNIGRAM).status == R


def test_gap_with_seeds_needs_the_widening_beyond_noise():
    corpus = {"unigram_perplexity": UNIGRAM, "floor_nll": FLOOR}
    gap_sd = rules.Spread(2.0, 3, 2, 2, log=False, what="of the gap")  # 2·SE = 4 at 2 seeds
    o = rules.rule_gap(gaps([20, 22, 23], n_runs=2), gap_sd, **corpus)
    assert o.status == NR and "vs 2·SE 4" in said(o).reason
    assert rules.rule_gap(gaps([20, 22, 25], n_runs=2), gap_sd, **corpus).status == R


# --- claim 4: degradation at 131072 experts ------------------------------------------------------

HELPS = {32: 60.0, 256: 55.0, 16384: 50.0, 65536: 48.0}


def test_degrade_states():
    assert rules.rule_degrade(models({**HELPS, 131072: 49.0})).status == R  # +2.1%
    assert rules.rule_degrade(models({**HELPS, 131072: 48.3})).status == NR  # +0.6%: within 1%
    assert rules.rule_degrade(models({65536: 48.0, 131072: 49.0})).status == NRUN  # no 16384
    assert rules.rule_degrade(models({**HELPS, 131072: 49.0}).iloc[:0]).status == NRUN
    assert rules.rule_degrade(models({**HELPS})).status == NRUN  # 65536 ran, 131072 did not
    short = models({32: 60.0, 16384: 50.0}, k=4).assign(batch_positions=16384.0)
    o = rules.rule_degrade(short)  # a sweep that stops at 16384 experts cannot test the claim
    assert (
        o.status == NT
        and said(o).why == "the sweep stops at 16,384 experts, short of 65,536 and 131,072"
    )
    assert (
        "tokens per expert per step: 65,536 experts 1 (paper 153), 131,072 experts 0.5"
        in said(o).reason
    )


def test_degrade_band_from_seeds():
    df = models({**HELPS, 131072: 49.0}, n_runs=2)  # +2.1%
    assert rules.rule_degrade(df, spread(0.005)).status == R  # band 1%
    assert rules.rule_degrade(df, spread(0.02)).status == NR  # band 4%


def test_degrade_not_testable_where_more_experts_do_not_help():
    flat = {32: 50.0, 256: 51.0, 16384: 55.0, 65536: 56.0, 131072: 58.0}
    o = rules.rule_degrade(models(flat))
    assert o.status == NT and "do not help up to 16,384" in said(o).why
    assert (
        "no regime columns" in said(o).reason
        and ">= 2,097,152 positions per step" in said(o).reason
    )
    regime = models(flat, k=4).assign(
        batch_positions=4096.0,
        tokens_per_expert_per_step=lambda d: 4096 * 4 / d["num_experts"],
        paper_tokens_per_expert_per_step=lambda d: 2.5e6 * 4 / d["num_experts"],
        tokens_per_parameter=0.01,
        paper_tokens_per_parameter=4.0,
    )
    o = rules.rule_degrade(regime)
    assert "tokens per expert per step: 65,536 experts 0.25 (paper 152.6)" in said(o).reason
    assert "131,072 experts 0.125 (paper 76.29)" in said(o).reason
    assert "tokens per parameter: 65,536 experts 0.01 (paper 4)" in said(o).reason
    assert "this run: 4,096 positions per step" in said(o).reason
    # a baseline (no experts) is not the smallest MoE
    base = pd.concat([models({0: 70.0}, family="baseline"), models(HELPS | {131072: 49.0})])
    assert rules.rule_degrade(base.assign(family=base["family"].fillna("MoE"))).status == R


# --- claim 5 and the paper ---------------------------------------------------------------------


def test_balance_states():
    off = {"w_importance": 0.0, "w_load": 0.0, "cv_importance": 2.0, "cv_load": 2.0}
    on = {"w_importance": 0.1, "w_load": 0.1, "cv_importance": 0.2, "cv_load": 0.2}
    df = pd.DataFrame([{**off, "max_over_mean_load": 9.0}, {**on, "max_over_mean_load": 1.5}])
    assert rules.rule_balance(df).status == R
    assert rules.rule_balance(df.assign(cv_load=[2.0, 1.5])).status == NR
    assert rules.rule_balance(df.iloc[1:]).status == NRUN


@pytest.mark.parametrize("key", list(evidence.RULE_FUNCTIONS))
def test_every_rule_holds_on_the_papers_numbers(key):
    o = evidence.RULE_FUNCTIONS[key](evidence.paper_data()[key], **evidence.PAPER_ARGS[key])
    assert o.status == R, said(o).reason
    if key != "balance":
        assert report.PAPER_ONE_NUMBER in said(o).reason
    if key == "gap":
        assert report.PAPER_PAST_UNIGRAM in said(o).reason


# --- the results' numbers -----------------------------------------------------------------------


def test_rules_return_their_statistic_band_n_and_rows():
    """The numbers a verdict follows from, before report.py words them."""
    o = rules.rule_more_experts(models({4: 120, 32: 126, 256: 100}, n_runs=2), spread(0.02))
    assert (o.status, o.n, list(o.rows.index)) == (NR, 3, [4, 32, 256])
    assert o.statistic == pytest.approx(100 / 120 - 1) and o.band == pytest.approx(0.04)
    assert [(s.lo, s.hi) for s in o.rises] == [(4, 32)] and o.rises[0].change == pytest.approx(0.05)
    o = rules.rule_more_experts(models({4: 100}))
    assert (o.status, o.n, o.statistic, o.case) == (NRUN, 1, None, "too few")
    h = rules.rule_hier_flat(pairs(100, 104, 2), {"lm1b": spread(0.01)})
    assert (h.n, h.band, h.statistic) == (1, rules.HIER_FLAT_TOL, pytest.approx(0.04))
    assert h.pairs[0].two_se == pytest.approx(0.02) and h.pairs[0].resolved
    g = rules.rule_gap(gaps([20, 22, 25]), unigram_perplexity=UNIGRAM, floor_nll=FLOOR)
    assert (g.status, g.n, g.band) == (R, 3, None)
    assert g.statistic == pytest.approx(np.polyfit([5, 6, 7], [20, 22, 25], 1)[0])
    assert g.stage.limit == pytest.approx(0.5 * (math.log(UNIGRAM) - FLOOR))
    assert g.stage.excess == pytest.approx(math.log(80.0) - FLOOR)
    d = rules.rule_degrade(models({**HELPS, 131072: 49.0}))
    assert (d.status, d.n, d.band, d.smallest) == (R, 5, 0.01, 32)
    assert d.statistic == pytest.approx(49 / 48 - 1) and d.fall == pytest.approx(50 / 60 - 1)
    off = {"w_importance": 0.0, "w_load": 0.0, "cv_importance": 2.0, "cv_load": 2.0}
    on = {"w_importance": 0.1, "w_load": 0.1, "cv_importance": 0.2, "cv_load": 0.5}
    df = pd.DataFrame([{**off, "max_over_mean_load": 9.0}, {**on, "max_over_mean_load": 1.5}])
    b = rules.rule_balance(df)
    assert (b.status, b.n, b.band, b.statistic) == (R, 1, 0.5, pytest.approx(0.25))
    assert b.off == (2.0, 2.0, 9.0) and len(b.rows) == 2


# --- REPORT.md -----------------------------------------------------------------------------------


def test_render_shows_not_testable_with_its_reason_and_the_regime():
    v = report.Verdict(
        "degrade", NT, "details", rules.PAPER_HOLDS, "paper", pd.DataFrame(), "short why"
    )
    summary = pd.DataFrame(
        {
            "sweep": ["news100b"] * 3,
            "family": "hierarchical MoE",
            "model": ["MoE-65536-h", "MoE-65536-h", "MoE-131072-h"],
            "paper_model": ["MoE-65536-h", "MoE-65536-h", "MoE-131072-h"],
            "moe": "hierarchical",
            "num_experts": [65536, 65536, 131072],
            "steps": [100, 120, 100],
            "regime.batch_positions": 4096,
            "regime.tokens_per_expert_per_step": [0.25, 0.25, 0.125],
            "regime.paper_tokens_per_expert_per_step": [152.6, 152.6, 76.3],
        }
    )
    text = report.render([v], summary)
    assert f"| **{NT}** (short why) |" in text
    assert "runs (seeds) per model: 1-2" in text and "unigram perplexity: unknown" in text
    assert "## Regime" in text and "### news100b" in text
    assert "| MoE-65536-h | 65,536 | 2 | 4,096 | 110 | 0.25 | 152.6 |" in text
    assert "Not in `summary.csv`" in text and "regime.tokens_per_parameter" in text
