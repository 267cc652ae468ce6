"""The claims' rules: for each claim of the paper one explicit rule (`rule_*`, a pure function of a
small frame and the seed spread) that returns a typed result: its status (reproduced, not
reproduced, not testable at this scale: the runs cannot decide the claim, or not run: the runs it
needs are missing), the statistic it decides on, the band that statistic is held against, how many
models (or pairs) it compared, the rows it used, and the further numbers its verdict follows from.
Rules return numbers only: analysis/evidence.py shapes the runs (and the paper's own numbers, a
check that each rule is fair) for them, analysis/report.py words every result in REPORT.md (the
rules' statements, `RULES`, are there too). Absolute perplexities are not compared (our corpus
and budgets are not the paper's); every rule compares our runs with each other, as the paper
compares its models.

Seeds. A model's runs (seeds) are averaged. Where models have >= 2 runs, the seed-to-seed standard
deviation of ln(test perplexity) (a relative SD) is pooled over the models of the sweep
(`pooled_spread`: per model the sample variance, ddof = 1, weighted by its degrees of freedom).
A difference of two model means of n_a and n_b runs then has the standard error
SE = SD·sqrt(1/n_a + 1/n_b), and a change counts only beyond 2 SE (about 95%, two-sided). With one
run per model no spread is measured and the rules fall back to fixed tolerances.

Claims (arXiv 1701.06538, Sec. 5.1-5.2, App. A): more experts give lower perplexity at equal
compute (Fig. 2-left, Table 7); hierarchical MoE matches flat MoE (Table 7); the gap between N and
10N tokens widens with capacity (Fig. 3, Table 8); quality degrades at 131072 experts (Table 8);
the balancing losses fix the load imbalance (Table 6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np
import pandas as pd

REPRODUCED, NOT_REPRODUCED, NOT_RUN = "reproduced", "not reproduced", "not run"
NOT_TESTABLE = "not testable at this scale"
STATUSES = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE, NOT_RUN)
PAPER_HOLDS, PAPER_FAILS = "holds", "fails"  # the rule on the paper's own numbers
MORE_EXPERTS_TOL = 0.01  # a relative perplexity change within ±1% counts as "no change"
NOISE_SE = 2.0  # a difference of two model means counts beyond 2 standard errors (~95%)
COMPUTE_MATCH_TOL = 0.25  # "equal compute": ops/timestep within ±25% of the sweep's MoE median
HIER_FLAT_TOL = 0.03  # "matches": within ±3% (the paper's MoE-256-h vs MoE-256 is +0.8%)
TRIVIAL_FRACTION = 0.5  # claim 3: at N, at most half the unigram model's excess over the floor
BALANCE_FACTOR = 0.5  # "fixes": each CV at most half of the CV without the losses
DEGRADE_PAIR = (65536, 131072)
HELPS_UP_TO = 16384  # claim 4 counts only where more experts help up to here (Table 8 does)
# claim 4's regime: the paper's ~2.5M-word batch (App. D) at k = 4 of 131072 experts gives ~76
# tokens per expert per step; "about 64" is the order of magnitude a test of the claim needs
PAPER_BATCH_WORDS = 2.5e6
PAPER_K = 4.0  # App. D's experts per token (k = 2 + 2 hierarchical); the default where k is unknown
MIN_TOKENS_PER_EXPERT = 64
# claim 4's regime columns (report.degrade_data: summary.csv's regime.* without the prefix)
REGIME_MEASURES = ("tokens_per_expert_per_step", "tokens_per_parameter")


# --- seed spread --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Seed-to-seed standard deviation pooled over models (None: no model has >= 2 runs).

    log: the SD is of ln(value), a relative SD; else in the value's unit."""

    sd: float | None = None
    n_models: int = 0  # models with >= 2 runs
    fewest: int = 1  # runs of those models: fewest, most
    most: int = 1
    log: bool = True
    what: str = ""  # the measure, e.g. "of the gap" (report.py puts it in the SD's name)
    printed: bool = False  # the paper's printed numbers: one per model, no spread

    @property
    def measured(self) -> bool:
        return self.sd is not None and math.isfinite(self.sd)

    def se_diff(self, n_a: float, n_b: float) -> float:
        """The standard error of a difference of two model means of n_a and n_b runs."""
        assert self.sd is not None  # measured: the callers check
        return float(self.sd) * math.sqrt(1 / n_a + 1 / n_b)


PAPER_SPREAD = Spread(printed=True)


def pooled_spread(
    runs: pd.DataFrame,
    value: str = "test_perplexity",
    by: str = "model",
    *,
    log: bool = True,
    what: str = "",
) -> Spread:
    """The seed-to-seed SD of `value` (of ln(value) when log) pooled over the `by` groups with
    >= 2 runs: sqrt(sum((n_i - 1)·s_i²) / sum(n_i - 1)), s_i the group's sample SD (ddof = 1)."""
    if runs.empty or value not in runs or by not in runs:
        return Spread(log=log, what=what)
    x = pd.to_numeric(runs[value], errors="coerce").astype(float)
    if log:
        x = np.log(x.where(x > 0))
    x = x[np.isfinite(x)]
    g = x.groupby(runs.loc[x.index, by], sort=False)
    n, var = g.count(), g.var(ddof=1)
    keep = n >= 2
    if not keep.any():
        return Spread(log=log, what=what)
    dof = n[keep] - 1
    sd = float(np.sqrt((dof * var[keep]).sum() / dof.sum()))
    return Spread(sd, int(keep.sum()), int(n[keep].min()), int(n[keep].max()), log, what)


@dataclass(frozen=True)
class Band:
    """The relative change two model means must exceed to count: max(floor, 2·SE), SE of the
    difference of means of n_a and n_b runs; the floor alone where no spread is measured."""

    value: float
    floor: float
    spread: Spread
    two_se: float | None = None  # None: no spread measured
    n_a: float = 1.0
    n_b: float = 1.0


def noise_band(spread: Spread, n_a: float, n_b: float, floor: float) -> Band:
    """The band a relative change of two model means of n_a and n_b runs must exceed."""
    if not spread.measured:
        return Band(floor, floor, spread)
    two_se = NOISE_SE * spread.se_diff(n_a, n_b)
    return Band(max(floor, two_se), floor, spread, two_se, n_a, n_b)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """A rule's answer: one of STATUSES; the statistic it decides on and the band that statistic
    is held against (None where the rule got no further than its inputs); n, the models (or pairs)
    it compared; the rows it used; and `case`, which of the rule's early exits it took ("" where
    it reached its comparison). Each rule's subclass adds the numbers its verdict follows from."""

    status: str
    statistic: float | None = None
    band: float | None = None
    n: int = 0
    rows: pd.DataFrame = field(default_factory=pd.DataFrame, compare=False, repr=False)
    case: str = ""


@dataclass(frozen=True)
class Step:
    """A change of perplexity from one expert count to the next larger one."""

    lo: object  # the expert counts, as the frame holds them
    hi: object
    change: float  # p(hi) / p(lo) - 1


@dataclass(frozen=True)
class MoreExperts(Result):
    """statistic: the relative change of perplexity from the fewest to the most experts; rows:
    per expert count the best model (index num_experts); rises: the steps beyond the band."""

    noise: Band | None = None
    rises: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Pair:
    """A flat model and the hierarchical one with as many experts, in one sweep (claim 2)."""

    sweep: str
    num_experts: float  # the summary's value (an integer count)
    flat: float
    hierarchical: float
    change: float  # hierarchical / flat - 1
    n_flat: float
    n_hier: float
    two_se: float | None  # None: the sweep measured no spread
    resolved: bool  # 2·SE within the tolerance (or no spread: the plain rule)


@dataclass(frozen=True)
class HierFlat(Result):
    """statistic: the largest |change| of a resolved pair; band: HIER_FLAT_TOL; spreads: the
    sweeps' spreads, by sweep name."""

    pairs: tuple[Pair, ...] = ()
    spreads: tuple[tuple[str, Spread], ...] = ()


@dataclass(frozen=True)
class Stage:
    """Claim 3's check that the N snapshot is past the trivial (unigram) stage."""

    unigram_perplexity: float
    floor: float  # nats; 0 where unknown (a stricter check)
    floor_known: bool
    limit: float  # TRIVIAL_FRACTION of the unigram's excess over the floor, nats
    early_min: float
    early_max: float
    excess: float  # the largest ln(perplexity at N) - floor over the models


@dataclass(frozen=True)
class Gap(Result):
    """statistic: the slope of the gap per decade of parameters; band: 2·SE of the largest minus
    the smallest model's gap (None without a measured spread); case: "unknown unigram" or
    "unigram stage" where the N snapshot cannot be shown past the unigram stage."""

    gaps: tuple[float, ...] = ()
    first: pd.Series | None = field(default=None, compare=False, repr=False)  # smallest model
    last: pd.Series | None = field(default=None, compare=False, repr=False)  # largest model
    spread: Spread = Spread(log=False)
    past_unigram: bool = False  # given (the paper's numbers), not checked
    stage: Stage | None = None
    wider: bool = False
    late_ahead: bool | None = None  # None: the rows have no late_perplexity


@dataclass(frozen=True)
class Measure:
    """A regime measure of the large models: per expert count, ours and the paper's (None)."""

    column: str
    values: tuple[tuple[int, float, float | None], ...] | None  # None: the column is missing


@dataclass(frozen=True)
class Regime:
    """Claim 4's scale: where the sweep stands against the regime a test of the claim needs."""

    measures: tuple[Measure, ...] | None  # None: no regime column at all
    batch: float | None  # the sweep's largest positions per step (None: unknown)
    k: float  # the sweep's experts per token
    at_pair: tuple[tuple[int, float, float], ...]  # (experts, b·k/n at the batch, the paper's)
    needs_k: float  # the largest model's k
    needs_positions: float  # positions per step giving it MIN_TOKENS_PER_EXPERT
    paper_tokens_per_expert: float  # App. D's at the largest count
    run_positions: float | None  # the largest model's positions per step


@dataclass(frozen=True)
class Degrade(Result):
    """statistic: the relative change from DEGRADE_PAIR[0] to [1] experts; rows: per expert count
    the best MoE model; case: "pair missing" (neither or one of DEGRADE_PAIR run), "short" (the
    sweep stops short of the pair), "no helps" (HELPS_UP_TO or a smaller MoE missing), "not
    helping" (more experts do not help up to HELPS_UP_TO)."""

    counts: tuple = ()  # the expert counts run
    largest: int = 0
    noise: Band | None = None
    smallest: object = None  # the smallest MoE's expert count
    fall: float = 0.0  # the relative change from the smallest MoE to HELPS_UP_TO experts
    rises: tuple[Step, ...] = ()
    regime: Regime | None = None


@dataclass(frozen=True)
class LossRun:
    """A balance-sweep run with both losses beside the run without them."""

    w_importance: float
    w_load: float
    cv_importance: float
    cv_load: float
    max_over_mean_load: float
    importance_ratio: float  # to the no-loss run's
    load_ratio: float
    ok: bool


@dataclass(frozen=True)
class Balance(Result):
    """statistic: the largest CV ratio to the no-loss run; band: BALANCE_FACTOR; off: the no-loss
    run's (CV(Importance), CV(Load), max/mean load)."""

    off: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    on: tuple[LossRun, ...] = ()


# --- helpers ------------------------------------------------------------------------------------


def _runs(df: pd.DataFrame) -> pd.Series:
    """n_runs per row (1 where the frame has none: the paper's numbers)."""
    if "n_runs" not in df:
        return pd.Series(1, index=df.index)
    return pd.to_numeric(df["n_runs"], errors="coerce").fillna(1).clip(lower=1)


def known(value) -> TypeGuard[float]:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _best_per_count(df: pd.DataFrame) -> pd.DataFrame:
    """Per expert count the row with the lowest test perplexity (index: num_experts)."""
    d = df.assign(n_runs=_runs(df)).dropna(subset=["test_perplexity"])
    idx = d.groupby("num_experts")["test_perplexity"].idxmin()
    return d.loc[idx.to_numpy()].set_index("num_experts").sort_index()


def _rises(best: pd.DataFrame, band: float) -> tuple[Step, ...]:
    n, p = best.index.to_numpy(), best["test_perplexity"].to_numpy(float)
    return tuple(
        Step(n[i], n[i + 1], p[i + 1] / p[i] - 1)
        for i in range(len(p) - 1)
        if p[i + 1] / p[i] - 1 > band
    )


# --- the rules ----------------------------------------------------------------------------------


def rule_more_experts(df: pd.DataFrame, spread: Spread = Spread()) -> MoreExperts:
    """df: num_experts, test_perplexity, n_runs (optional; one row per model). spread: the
    sweep's seed spread of ln(test perplexity)."""
    best = _best_per_count(df)
    if len(best) < 2:
        return MoreExperts(NOT_RUN, n=len(best), rows=best, case="too few")
    p = best["test_perplexity"].to_numpy(float)
    fewest = float(best["n_runs"].min())
    band = noise_band(spread, fewest, fewest, MORE_EXPERTS_TOL)
    change = p[-1] / p[0] - 1
    rises = _rises(best, band.value)
    holds = change < -band.value and not rises
    status = REPRODUCED if holds else NOT_REPRODUCED
    return MoreExperts(status, change, band.value, len(best), best, noise=band, rises=rises)


def _pair(r, sweep: str, nf: float, nh: float, spread: Spread) -> Pair:
    rel = r.hierarchical / r.flat - 1
    two_se = NOISE_SE * spread.se_diff(float(nf), float(nh)) if spread.measured else None
    resolved = two_se is None or two_se <= HIER_FLAT_TOL
    return Pair(sweep, r.num_experts, r.flat, r.hierarchical, rel, nf, nh, two_se, resolved)


def rule_hier_flat(pairs: pd.DataFrame, spreads: Mapping[str, Spread] | None = None) -> HierFlat:
    """pairs: sweep (optional), num_experts, flat, hierarchical (test perplexities), n_flat,
    n_hier (optional). spreads: per sweep, its seed spread of ln(test perplexity)."""
    if pairs.empty:
        return HierFlat(NOT_RUN, rows=pairs, case="no pair")
    spreads = spreads or {}
    sweeps = pairs["sweep"] if "sweep" in pairs else pd.Series("", index=pairs.index)
    n_flat = pairs["n_flat"] if "n_flat" in pairs else pd.Series(1, index=pairs.index)
    n_hier = pairs["n_hier"] if "n_hier" in pairs else pd.Series(1, index=pairs.index)
    found = tuple(
        _pair(r, sweep, nf, nh, spreads.get(sweep, Spread()))
        for r, sweep, nf, nh in zip(pairs.itertuples(), sweeps, n_flat, n_hier, strict=True)
    )
    failed = [p for p in found if p.resolved and abs(p.change) > HIER_FLAT_TOL]
    unresolved = [p for p in found if not p.resolved]
    status = NOT_REPRODUCED if failed else NOT_TESTABLE if unresolved else REPRODUCED
    worst = max((abs(p.change) for p in found if p.resolved), default=None)
    used = tuple((s, spreads.get(s, Spread())) for s in sorted(set(sweeps)))
    return HierFlat(status, worst, HIER_FLAT_TOL, len(found), pairs, pairs=found, spreads=used)


def _stage(df: pd.DataFrame, unigram_perplexity: float, floor_nll: float | None) -> Stage:
    floor = float(floor_nll) if known(floor_nll) else 0.0
    limit = TRIVIAL_FRACTION * (math.log(unigram_perplexity) - floor)
    early = df["early_perplexity"].to_numpy(float)
    excess = np.log(early) - floor
    worst = excess[int(np.argmax(excess))]
    return Stage(
        unigram_perplexity, floor, known(floor_nll), limit, early.min(), early.max(), worst
    )


def rule_gap(
    df: pd.DataFrame,
    spread: Spread = Spread(log=False),
    *,
    unigram_perplexity: float | None = None,
    floor_nll: float | None = None,
    past_unigram: bool = False,
) -> Gap:
    """df: params (any unit), gap, early_perplexity, late_perplexity and n_runs (optional; one
    row per model).
    spread: the sweep's seed spread of the gap (perplexity units). unigram_perplexity and
    floor_nll: the corpus's; past_unigram: the N snapshot is known to be past the unigram stage
    (the paper's numbers, whose unigram perplexity is unknown): the check is skipped."""
    df = df.assign(n_runs=_runs(df)).sort_values("params")
    if len(df) < 3:
        return Gap(NOT_RUN, n=len(df), rows=df, case="too few")
    slope = float(np.polyfit(np.log10(df["params"].to_numpy(float)), df["gap"], 1)[0])
    first, last = df.iloc[0], df.iloc[-1]
    gap = Gap(
        NOT_RUN,
        slope,
        None,
        len(df),
        df,
        gaps=tuple(df["gap"]),
        first=first,
        last=last,
        spread=spread,
        past_unigram=past_unigram,
    )
    if not past_unigram:
        if not known(unigram_perplexity):
            return _with(gap, NOT_TESTABLE, case="unknown unigram")
        assert unigram_perplexity is not None  # known
        stage = _stage(df, unigram_perplexity, floor_nll)
        gap = _with(gap, gap.status, stage=stage)
        if stage.excess > stage.limit:
            return _with(gap, NOT_TESTABLE, case="unigram stage")
    two_se = NOISE_SE * spread.se_diff(first.n_runs, last.n_runs) if spread.measured else None
    wider = last.gap - first.gap > two_se if two_se is not None else last.gap > first.gap
    holds = slope > 0 and wider
    ahead = None
    if "late_perplexity" in df:  # more capacity must use the data, not only catch up
        ahead = last.late_perplexity <= first.late_perplexity
        holds = holds and ahead
    status = REPRODUCED if holds else NOT_REPRODUCED
    return _with(gap, status, band=two_se, wider=wider, late_ahead=ahead)


def _with(result, status: str, **changes):
    """`result` with another status (and fields)."""
    return dataclasses.replace(result, status=status, **changes)


def _measures(df: pd.DataFrame) -> tuple[Measure, ...] | None:
    """The large models' regime measures (REGIME_MEASURES) with the paper's; None without any."""
    if not any(c in df and df[c].notna().any() for c in REGIME_MEASURES):
        return None
    out = []
    for col in REGIME_MEASURES:
        if col not in df:
            out.append(Measure(col, None))
            continue
        values = []
        for n in DEGRADE_PAIR:
            rows = df[df["num_experts"] == n]
            if rows.empty:
                continue
            theirs = rows.get(f"paper_{col}")
            paper = theirs.mean() if theirs is not None and theirs.notna().any() else None
            values.append((n, rows[col].mean(), paper))
        out.append(Measure(col, tuple(values)))
    return tuple(out)


def _regime(df: pd.DataFrame) -> Regime:
    """Claim 4's scale (Sec. 3.1: an expert sees b·k/n positions per step of b at k of n)."""
    batch = None
    if "batch_positions" in df and not df["batch_positions"].isna().all():
        batch = float(df["batch_positions"].max())
    k = float(df["k"].max()) if "k" in df and df["k"].notna().any() else PAPER_K
    at_pair = tuple(
        (n, batch * k / n if batch is not None else math.nan, PAPER_BATCH_WORDS * PAPER_K / n)
        for n in DEGRADE_PAIR
    )
    hi = DEGRADE_PAIR[1]
    rows = df[df["num_experts"] == hi]
    needs_k = rows["k"].mean() if "k" in rows and rows["k"].notna().any() else PAPER_K
    run_positions = None
    if "batch_positions" in rows and rows["batch_positions"].notna().any():
        run_positions = rows["batch_positions"].mean()
    return Regime(
        _measures(df),
        batch,
        k,
        at_pair,
        needs_k,
        MIN_TOKENS_PER_EXPERT * hi / needs_k,
        PAPER_BATCH_WORDS * PAPER_K / hi,
        run_positions,
    )


def rule_degrade(df: pd.DataFrame, spread: Spread = Spread()) -> Degrade:
    """df: num_experts, test_perplexity (final), n_runs, family, k (optional), and the regime
    columns batch_positions, tokens_per_expert_per_step, tokens_per_parameter and their paper_
    counterparts (optional; one row per model). spread: the sweep's seed spread of ln(test
    perplexity)."""
    moe = df[df["family"] != "baseline"] if "family" in df else df[df["num_experts"] > 1]
    best = _best_per_count(moe) if not moe.empty else moe
    lo, hi = DEGRADE_PAIR
    counts = tuple(best.index) if not best.empty else ()
    found = Degrade(NOT_RUN, n=len(counts), rows=best, counts=counts, regime=_regime(df))
    if best.empty:
        return _with(found, NOT_RUN, case="pair missing")
    if lo not in best.index or hi not in best.index:
        largest = int(best.index.max())
        if largest >= lo:  # one of the pair ran: a run is missing, not the scale
            return _with(found, NOT_RUN, case="pair missing")
        return _with(found, NOT_TESTABLE, case="short", largest=largest)
    upto = best[best.index <= HELPS_UP_TO]
    if HELPS_UP_TO not in best.index or len(upto) < 2:
        return _with(found, NOT_RUN, case="no helps")
    fewest = float(best.loc[[*upto.index, lo, hi], "n_runs"].min())
    band = noise_band(spread, fewest, fewest, MORE_EXPERTS_TOL)
    p = best["test_perplexity"]
    change = p[hi] / p[lo] - 1
    fall = p[HELPS_UP_TO] / p[upto.index[0]] - 1
    rises = _rises(upto, band.value)
    found = _with(
        found,
        NOT_RUN,
        statistic=change,
        band=band.value,
        noise=band,
        smallest=upto.index[0],
        fall=fall,
        rises=rises,
    )
    if fall < -band.value and not rises:
        return _with(found, REPRODUCED if change > band.value else NOT_REPRODUCED)
    return _with(found, NOT_TESTABLE, case="not helping")


def rule_balance(df: pd.DataFrame) -> Balance:
    """df: w_importance, w_load, cv_importance, cv_load, max_over_mean_load (means over seeds)."""
    off = df[(df["w_importance"] == 0) & (df["w_load"] == 0)]
    on = df[(df["w_importance"] > 0) & (df["w_load"] > 0)]
    if off.empty or on.empty:
        return Balance(NOT_RUN, n=len(on), rows=df, case="no pair")
    o = off.iloc[0]
    runs = []
    for r in on.itertuples():
        ok = (
            r.cv_importance <= BALANCE_FACTOR * o.cv_importance
            and r.cv_load <= BALANCE_FACTOR * o.cv_load
            and r.max_over_mean_load < o.max_over_mean_load
        )
        runs.append(
            LossRun(
                r.w_importance,
                r.w_load,
                r.cv_importance,
                r.cv_load,
                r.max_over_mean_load,
                r.cv_importance / o.cv_importance,
                r.cv_load / o.cv_load,
                bool(ok),
            )
        )
    holds = all(r.ok for r in runs)
    worst = max(max(r.importance_ratio, r.load_ratio) for r in runs)
    return Balance(
        REPRODUCED if holds else NOT_REPRODUCED,
        worst,
        BALANCE_FACTOR,
        len(runs),
        pd.concat([off.iloc[:1], on]),
        off=(o.cv_importance, o.cv_load, o.max_over_mean_load),
        on=tuple(runs),
    )
