"""The claims' rules: for each claim of the paper one explicit rule (`rule_*`, a pure function of a
small frame and the seed spread) that returns an `Outcome`: reproduced, not reproduced, not
testable at this scale (the runs cannot decide the claim; the reason gives the measurement that says
so) or not run (the runs it needs are missing), with the numbers behind it. analysis/report.py
shapes the runs (and the paper's own numbers, a check that each rule is fair) for them and writes
REPORT.md. Absolute perplexities are not compared (our corpus and budgets are not the paper's);
every rule compares our runs with each other, as the paper compares its models.

Seeds. A model's runs (seeds) are averaged. Where models have >= 2 runs, the seed-to-seed standard
deviation of ln(test perplexity) (a relative SD) is pooled over the models of the sweep
(`pooled_spread`: per model the sample variance, ddof = 1, weighted by its degrees of freedom).
A difference of two model means of n_a and n_b runs then has the standard error
SE = SD·sqrt(1/n_a + 1/n_b), and a change counts only beyond 2 SE (about 95%, two-sided). With one
run per model no spread is measured and the rules fall back to fixed tolerances, and say so.

Claims (Sec. 5.1-5.2, App. A): more experts give lower perplexity at equal compute (Fig. 2-left,
Table 7); hierarchical MoE matches flat MoE (Table 7); the gap between N and 10N tokens widens with
capacity (Fig. 3, Table 8); quality degrades at 131072 experts (Table 8); the balancing losses fix
the load imbalance (Table 6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis import tables

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
MIN_TOKENS_PER_EXPERT = 64
ONE_SEED = "one seed per model: no seed spread measured"
PAPER_ONE_NUMBER = "the paper gives one number per model: no seed spread"
PAPER_PAST_UNIGRAM = "paper: 10B-word snapshot well past unigram (Table 8)"
UNIGRAM_COLUMN, FLOOR_COLUMN = "corpus.unigram_perplexity", "floor_nll"
# summary.csv's regime columns (absent in summaries collected before they were recorded)
REGIME_COLUMNS = {
    "regime.batch_positions": "batch positions",
    "regime.paper_batch_positions": "batch positions (paper)",
    "steps": "steps",
    "regime.paper_steps": "steps (paper)",
    "regime.tokens_per_expert_per_step": "tokens/expert/step",
    "regime.paper_tokens_per_expert_per_step": "tokens/expert/step (paper)",
    "regime.tokens_per_parameter": "tokens/parameter",
    "regime.paper_tokens_per_parameter": "tokens/parameter (paper)",
}

_BAND = (
    f"band = max({MORE_EXPERTS_TOL:.0%}, 2·SE), SE = SD·sqrt(2/n) the standard error of a "
    "difference of two model means, SD the seed-to-seed SD of ln(test perplexity) pooled over "
    "the sweep's models with >= 2 seeds, n the fewest seeds among the expert counts compared; "
    f"with one seed per model the band is {MORE_EXPERTS_TOL:.0%}"
)
RULES = {
    "more_experts": (
        "Take the MoE runs (flat and hierarchical) of the lm1b sweep whose ops/timestep is within "
        f"±{COMPUTE_MATCH_TOL:.0%} of the sweep's median MoE ops/timestep; per expert count, the "
        "lowest test perplexity (mean over seeds). Reproduced iff the largest expert count is "
        "lower than the smallest by more than the band, and no step to the next larger expert "
        f"count raises perplexity by more than the band ({_BAND}). A rise within the band is "
        "within seed noise, so it is no evidence of a rise; the same band makes the improvement "
        "harder to pass. Needs >= 2 expert counts."
    ),
    "hier_flat": (
        "For every expert count with both a flat and a hierarchical model in the same sweep "
        "(lm1b, news100b) at equal compute (ops/timestep within "
        f"±{COMPUTE_MATCH_TOL:.0%} of the sweep's median MoE ops/timestep, as in claim 1; of "
        "several hierarchical models, the one closest in ops/timestep), compare their test "
        "perplexities (means over seeds). Reproduced iff "
        f"every hierarchical one is within ±{HIER_FLAT_TOL:.0%} of its flat counterpart and the "
        f"runs resolve {HIER_FLAT_TOL:.0%}: where 2·SE of the difference (SE = SD·sqrt(1/n_flat + "
        "1/n_hier), SD the sweep's pooled seed-to-seed SD of ln(test perplexity)) exceeds "
        f"{HIER_FLAT_TOL:.0%}, the pair is not testable at this scale. A resolved pair outside "
        f"±{HIER_FLAT_TOL:.0%} makes the claim not reproduced. With one seed per model the plain "
        f"±{HIER_FLAT_TOL:.0%} rule applies. Needs >= 1 pair."
    ),
    "gap": (
        "In the news100b sweep, gap = test perplexity at the earliest snapshot (N tokens) minus "
        "at the final evaluation (10N), per model (means over seeds). It counts only where the N "
        "snapshot is past the trivial (unigram) stage: for every model, ln(perplexity at N) - "
        f"floor_nll <= {TRIVIAL_FRACTION:g}·(ln(the corpus's unigram perplexity) - floor_nll) "
        "(floor_nll: the corpus's Bayes-optimal NLL; 0 where unknown, a stricter check); "
        "otherwise, or where the unigram perplexity is unknown, not testable at this scale. "
        "Reproduced iff the least-squares slope of gap against log10(parameters excl. embedding "
        "and softmax) is positive and the largest model's gap exceeds the smallest model's (by "
        "more than 2·SE, SE = SD·sqrt(1/n_small + 1/n_large) from the gap's seed-to-seed SD "
        "pooled over the sweep's models, where seeds exist), and at 10N the largest model is no "
        "worse than the smallest (a large model that starts behind and only catches up widens "
        "the gap without using more data better). A non-monotonic gap can pass (the paper's "
        "does: 8.1 at MoE-32, 7.5 at MoE-256-h). Needs >= 3 models."
    ),
    "degrade": (
        "In the news100b sweep (means over seeds, per expert count the lowest), the claim counts "
        f"only where more experts help: from the smallest MoE to {HELPS_UP_TO:,} experts the "
        "final test perplexity falls by more than the band and no step to the next larger "
        f"expert count rises by more than it; otherwise not testable at this scale (the reason "
        "gives the tokens per expert per step and tokens per parameter of the large models, "
        f"and the batch a test needs). Reproduced iff {DEGRADE_PAIR[1]:,} experts is worse than "
        f"{DEGRADE_PAIR[0]:,} by more than the band ({_BAND}). Needs both, {HELPS_UP_TO:,} "
        "experts and a smaller MoE; a sweep that stops short of both is not testable at this "
        "scale (the reason gives the tokens per expert per step its batch would give them)."
    ),
    "balance": (
        "In the balance sweep (means over seeds), compare every run with both w_importance > 0 "
        "and w_load > 0 with the run without the losses (w_importance = w_load = 0). Reproduced "
        f"iff each of them has CV(Importance) and CV(Load) at most {BALANCE_FACTOR:g}x the no-loss "
        "run's and a lower max/mean load. Needs the no-loss run and >= 1 run with both losses."
    ),
}
CLAIMS = {
    "more_experts": (
        "More experts give lower perplexity at equal compute",
        "Fig. 2-left, Table 7 (App. C.1)",
    ),
    "hier_flat": ("Hierarchical MoE matches flat MoE", "Table 7 (MoE-256 vs MoE-256-h), App. B"),
    "gap": (
        "The gap between less and more training data widens with capacity",
        "Fig. 3, Table 8 (App. D)",
    ),
    "degrade": ("Quality degrades at 131072 experts", "Table 8 (Sec. 5.2: 'too much sparsity')"),
    "balance": ("The balancing losses fix the load imbalance", "Table 6 (App. A)"),
}


class Outcome(NamedTuple):
    """A rule's answer: one of STATUSES, the numbers it follows from, and for NOT_TESTABLE the
    short measured reason (the report's summary table shows it)."""

    status: str
    reason: str
    why: str = ""


# --- seed spread --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Seed-to-seed standard deviation pooled over models (None: no model has >= 2 runs).

    log: the SD is of ln(value), a relative SD (shown as %); else in the value's unit."""

    sd: float | None = None
    n_models: int = 0  # models with >= 2 runs
    fewest: int = 1  # runs of those models: fewest, most
    most: int = 1
    log: bool = True
    what: str = ""  # e.g. "of the gap"
    note: str = ""  # replaces describe() (the paper's numbers)

    @property
    def measured(self) -> bool:
        return self.sd is not None and math.isfinite(self.sd)

    def se_diff(self, n_a: float, n_b: float) -> float:
        """The standard error of a difference of two model means of n_a and n_b runs."""
        return float(self.sd) * math.sqrt(1 / n_a + 1 / n_b)

    def fmt(self, value: float) -> str:
        return f"{value:.1%}" if self.log else f"{value:.3g}"

    def describe(self) -> str:
        if self.note:
            return self.note
        if not self.measured:
            return ONE_SEED
        seeds = f"{self.fewest}" if self.fewest == self.most else f"{self.fewest}-{self.most}"
        what = f" {self.what}" if self.what else ""
        models = "model" if self.n_models == 1 else "models"
        return (
            f"seed-to-seed SD{what} {self.fmt(self.sd)} (pooled over {self.n_models} {models}, "
            f"{seeds} seeds each)"
        )


PAPER_SPREAD = Spread(note=PAPER_ONE_NUMBER)


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


def _band(spread: Spread, n_a: float, n_b: float, floor: float) -> tuple[float, str]:
    """The relative change two model means must exceed to count, and how it was set."""
    if not spread.measured:
        return floor, f"band {floor:.0%} ({spread.describe()})"
    two_se = NOISE_SE * spread.se_diff(n_a, n_b)
    band = max(floor, two_se)
    return band, (
        f"band {band:.1%} = max({floor:.0%}, 2·SE {two_se:.1%}), SE of a difference of means "
        f"of {_n(n_a)} and {_n(n_b)} seed(s), {spread.describe()}"
    )


def _n(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"


def _runs(df: pd.DataFrame) -> pd.Series:
    """n_runs per row (1 where the frame has none: the paper's numbers)."""
    if "n_runs" not in df:
        return pd.Series(1, index=df.index)
    return pd.to_numeric(df["n_runs"], errors="coerce").fillna(1).clip(lower=1)


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _best_per_count(df: pd.DataFrame) -> pd.DataFrame:
    """Per expert count the row with the lowest test perplexity (index: num_experts)."""
    d = df.assign(n_runs=_runs(df)).dropna(subset=["test_perplexity"])
    idx = d.groupby("num_experts")["test_perplexity"].idxmin()
    return d.loc[idx.to_numpy()].set_index("num_experts").sort_index()


def _seq(best: pd.DataFrame) -> str:
    return ", ".join(f"{int(k):,}: {v:.4g}" for k, v in best["test_perplexity"].items())


def _rises(best: pd.DataFrame, band: float) -> list[str]:
    n, p = best.index.to_numpy(), best["test_perplexity"].to_numpy(float)
    return [
        f"{n[i]:,}→{n[i + 1]:,} experts: {p[i + 1] / p[i] - 1:+.1%}"
        for i in range(len(p) - 1)
        if p[i + 1] / p[i] - 1 > band
    ]


# --- the rules ----------------------------------------------------------------------------------


def rule_more_experts(df: pd.DataFrame, spread: Spread = Spread()) -> Outcome:
    """df: num_experts, test_perplexity, n_runs (optional; one row per model). spread: the
    sweep's seed spread of ln(test perplexity)."""
    best = _best_per_count(df)
    if len(best) < 2:
        return Outcome(NOT_RUN, f"MoE runs at {len(best)} expert count(s); the rule needs 2")
    n, p = best.index.to_numpy(), best["test_perplexity"].to_numpy(float)
    fewest = float(best["n_runs"].min())
    band, band_text = _band(spread, fewest, fewest, MORE_EXPERTS_TOL)
    change = p[-1] / p[0] - 1
    rises = _rises(best, band)
    reason = (
        f"perplexity by experts ({_seq(best)}); {n[0]:,}→{n[-1]:,} experts: {change:+.1%}; "
        f"{band_text}"
    )
    if rises:
        reason += "; rises beyond the band: " + "; ".join(rises)
    holds = change < -band and not rises
    return Outcome(REPRODUCED if holds else NOT_REPRODUCED, reason)


def rule_hier_flat(pairs: pd.DataFrame, spreads: Mapping[str, Spread] | None = None) -> Outcome:
    """pairs: sweep (optional), num_experts, flat, hierarchical (test perplexities), n_flat,
    n_hier (optional). spreads: per sweep, its seed spread of ln(test perplexity)."""
    if pairs.empty:
        return Outcome(NOT_RUN, "no expert count has both a flat and a hierarchical model")
    spreads = spreads or {}
    parts, unresolved, failed = [], [], []
    sweeps = pairs["sweep"] if "sweep" in pairs else pd.Series("", index=pairs.index)
    n_flat = pairs["n_flat"] if "n_flat" in pairs else pd.Series(1, index=pairs.index)
    n_hier = pairs["n_hier"] if "n_hier" in pairs else pd.Series(1, index=pairs.index)
    for r, sweep, nf, nh in zip(pairs.itertuples(), sweeps, n_flat, n_hier, strict=True):
        rel = r.hierarchical / r.flat - 1
        spread = spreads.get(sweep, Spread())
        where = f"{sweep} " if sweep else ""
        text = (
            f"{where}{int(r.num_experts):,} experts: flat {r.flat:.4g}, hierarchical "
            f"{r.hierarchical:.4g} ({rel:+.1%}"
        )
        if spread.measured:
            two_se = NOISE_SE * spread.se_diff(float(nf), float(nh))
            text += f"; 2·SE {two_se:.1%} with {_n(nf)}/{_n(nh)} seeds"
            if two_se > HIER_FLAT_TOL:
                unresolved.append(f"{where}{int(r.num_experts):,} experts: 2·SE {two_se:.1%}")
                parts.append(text + ")")
                continue
        if abs(rel) > HIER_FLAT_TOL:
            failed.append(text)
        parts.append(text + ")")
    noise = sorted({s for s in sweeps})
    notes = [f"{s + ': ' if s else ''}{spreads.get(s, Spread()).describe()}" for s in noise]
    if not any(spreads.get(s, Spread()).measured for s in noise):
        notes.append(f"plain ±{HIER_FLAT_TOL:.0%} rule")
    reason = "; ".join(parts) + " — " + "; ".join(notes)
    if failed:
        return Outcome(NOT_REPRODUCED, reason)
    if unresolved:
        why = (
            f"2·SE of the flat-hierarchical difference exceeds ±{HIER_FLAT_TOL:.0%} "
            f"({'; '.join(unresolved)}): the seeds cannot resolve {HIER_FLAT_TOL:.0%}"
        )
        return Outcome(NOT_TESTABLE, f"{why}; {reason}", why)
    return Outcome(REPRODUCED, reason)


def rule_gap(
    df: pd.DataFrame,
    spread: Spread = Spread(log=False),
    *,
    unigram_perplexity: float | None = None,
    floor_nll: float | None = None,
    past_unigram: str = "",
) -> Outcome:
    """df: params (any unit), gap, early_perplexity, late_perplexity and n_runs (optional; one
    row per model).
    spread: the sweep's seed spread of the gap (perplexity units). unigram_perplexity and
    floor_nll: the corpus's; past_unigram: a note that replaces the trivial-stage check (the
    paper's numbers, whose unigram perplexity is unknown)."""
    df = df.assign(n_runs=_runs(df)).sort_values("params")
    if len(df) < 3:
        return Outcome(NOT_RUN, f"{len(df)} model(s) with both evaluations; the rule needs 3")
    slope = float(np.polyfit(np.log10(df["params"].to_numpy(float)), df["gap"], 1)[0])
    first, last = df.iloc[0], df.iloc[-1]
    seq = ", ".join(tables.fmt(g) for g in df["gap"])
    reason = (
        f"gaps by increasing size: {seq}; slope {slope:+.3g} per decade of parameters; "
        f"largest {tables.fmt(last.gap)} vs smallest {tables.fmt(first.gap)}"
    )
    if past_unigram:
        stage = past_unigram
    elif not _known(unigram_perplexity):
        why = "the corpus's unigram perplexity is unknown"
        return Outcome(
            NOT_TESTABLE,
            f"{why} (summary column {UNIGRAM_COLUMN}): no check that the N snapshot is past the "
            f"unigram stage; {reason}",
            why,
        )
    else:
        floor = float(floor_nll) if _known(floor_nll) else 0.0
        floor_text = (
            f"floor {floor:.3g} nats"
            if _known(floor_nll)
            else "floor unknown, taken as 0 nats (stricter)"
        )
        limit = TRIVIAL_FRACTION * (math.log(unigram_perplexity) - floor)
        early = df["early_perplexity"].to_numpy(float)
        excess = np.log(early) - floor
        worst = int(np.argmax(excess))
        stage = (
            f"unigram perplexity {unigram_perplexity:.4g}, {floor_text}; N-snapshot perplexities "
            f"{tables.fmt(early.min())}-{tables.fmt(early.max())}, at most {excess[worst]:.2f} "
            f"nats above the floor (limit: half the unigram's {2 * limit:.2f} = {limit:.2f})"
        )
        if excess[worst] > limit:
            why = (
                f"at N tokens the models are still near the unigram stage: N-snapshot perplexity "
                f"up to {tables.fmt(early.max())} vs unigram {unigram_perplexity:.4g}, "
                f"{excess[worst]:.2f} nats above the floor where the limit is {limit:.2f}"
            )
            return Outcome(NOT_TESTABLE, f"{why}; {stage}; {reason}", why)
    if spread.measured:
        two_se = NOISE_SE * spread.se_diff(first.n_runs, last.n_runs)
        wider = last.gap - first.gap > two_se
        noise = (
            f"largest - smallest {last.gap - first.gap:+.3g} vs 2·SE {two_se:.3g} "
            f"({_n(first.n_runs)}/{_n(last.n_runs)} seeds; {spread.describe()})"
        )
    else:
        wider = last.gap > first.gap
        noise = spread.describe()
    holds = slope > 0 and wider
    if "late_perplexity" in df:  # more capacity must use the data, not only catch up
        ahead = last.late_perplexity <= first.late_perplexity
        noise += (
            f"; at 10N the largest model {tables.fmt(last.late_perplexity)} vs the smallest "
            f"{tables.fmt(first.late_perplexity)}" + ("" if ahead else " (behind)")
        )
        holds = holds and ahead
    return Outcome(REPRODUCED if holds else NOT_REPRODUCED, f"{stage}; {reason}; {noise}")


def _regime_text(df: pd.DataFrame, counts: tuple[int, ...]) -> str:
    """The large models' tokens per expert per step and tokens per parameter, with the paper's."""
    cols = (
        ("tokens_per_expert_per_step", "tokens per expert per step"),
        ("tokens_per_parameter", "tokens per parameter"),
    )
    if not any(c in df and df[c].notna().any() for c, _ in cols):
        return (
            "the summary has no regime columns (regime.tokens_per_expert_per_step, "
            "regime.tokens_per_parameter; collected before they were recorded): tokens per expert "
            "per step and tokens per parameter unknown"
        )
    parts = []
    for col, label in cols:
        if col not in df:
            parts.append(f"{label}: unknown")
            continue
        vals = []
        for n in counts:
            rows = df[df["num_experts"] == n]
            if rows.empty:
                continue
            text = f"{n:,} experts {tables.fmt(rows[col].mean())}"
            theirs = rows.get(f"paper_{col}")
            if theirs is not None and theirs.notna().any():
                text += f" (paper {tables.fmt(theirs.mean())})"
            vals.append(text)
        parts.append(f"{label}: " + ", ".join(vals))
    return "; ".join(parts)


def _at_pair_text(df: pd.DataFrame) -> str:
    """What the sweep's batch would give the pair's experts per step (Sec. 3.1: b·k/n), beside
    App. D's, for a sweep that does not run them."""
    if "batch_positions" not in df or df["batch_positions"].isna().all():
        return "the sweep's batch is unknown (no regime columns)"
    b = float(df["batch_positions"].max())
    k = float(df["k"].max()) if "k" in df and df["k"].notna().any() else 4.0
    parts = [
        f"{n:,} experts {b * k / n:.2g} (paper {PAPER_BATCH_WORDS * 4 / n:.0f})"
        for n in DEGRADE_PAIR
    ]
    return f"at this sweep's {b:,.0f} positions per step, tokens per expert per step: " + ", ".join(
        parts
    )


def _needs_text(df: pd.DataFrame) -> str:
    """The batch a test of claim 4 needs (App. D's regime)."""
    hi = DEGRADE_PAIR[1]
    rows = df[df["num_experts"] == hi]
    k = rows["k"].mean() if "k" in rows and rows["k"].notna().any() else 4.0
    positions = MIN_TOKENS_PER_EXPERT * hi / k
    paper_tpe = PAPER_BATCH_WORDS * 4 / hi
    text = (
        f"a test needs a batch giving >= ~{MIN_TOKENS_PER_EXPERT} tokens per expert per step at "
        f"{hi:,} experts, i.e. >= {positions:,.0f} positions per step at k = {k:g}, as the "
        f"paper's ~2.5M-word batch (App. D; ~{paper_tpe:.0f} tokens per expert per step)"
    )
    if "batch_positions" in rows and rows["batch_positions"].notna().any():
        text += f"; this run: {rows['batch_positions'].mean():,.0f} positions per step"
    return text


def rule_degrade(df: pd.DataFrame, spread: Spread = Spread()) -> Outcome:
    """df: num_experts, test_perplexity (final), n_runs, family, k (optional), and the regime
    columns batch_positions, tokens_per_expert_per_step, tokens_per_parameter and their paper_
    counterparts (optional; one row per model). spread: the sweep's seed spread of ln(test
    perplexity)."""
    moe = df[df["family"] != "baseline"] if "family" in df else df[df["num_experts"] > 1]
    best = _best_per_count(moe) if not moe.empty else moe
    lo, hi = DEGRADE_PAIR
    run = ", ".join(f"{int(n):,}" for n in best.index) or "none"
    if best.empty:
        return Outcome(NOT_RUN, f"needs {lo:,} and {hi:,} experts; run: none")
    if lo not in best.index or hi not in best.index:
        largest = int(best.index.max())
        if largest >= lo:  # one of the pair ran: a run is missing, not the scale
            return Outcome(NOT_RUN, f"needs {lo:,} and {hi:,} experts; run: {run}")
        why = f"the sweep stops at {largest:,} experts, short of {lo:,} and {hi:,}"
        reason = f"{why} (run: {run}); {_at_pair_text(df)}; {_needs_text(df)}"
        return Outcome(NOT_TESTABLE, reason, why)
    upto = best[best.index <= HELPS_UP_TO]
    if HELPS_UP_TO not in best.index or len(upto) < 2:
        return Outcome(
            NOT_RUN,
            f"needs {HELPS_UP_TO:,} experts and a smaller MoE too (to see that more experts help "
            f"up to there); run: {run}",
        )
    fewest = float(best.loc[[*upto.index, lo, hi], "n_runs"].min())
    band, band_text = _band(spread, fewest, fewest, MORE_EXPERTS_TOL)
    p = best["test_perplexity"]
    change = p[hi] / p[lo] - 1
    fall = p[HELPS_UP_TO] / p[upto.index[0]] - 1
    rises = _rises(upto, band)
    reason = (
        f"perplexity by experts ({_seq(best)}); {upto.index[0]:,}→{HELPS_UP_TO:,} experts: "
        f"{fall:+.1%}; {lo:,}→{hi:,} experts: {change:+.1%}; {band_text}"
    )
    if fall < -band and not rises:
        return Outcome(REPRODUCED if change > band else NOT_REPRODUCED, reason)
    how = f"{upto.index[0]:,}→{HELPS_UP_TO:,} experts {fall:+.1%}"
    if rises:
        how += ", rises beyond the band at " + ", ".join(rises)
    why = (
        f"more experts do not help up to {HELPS_UP_TO:,} experts ({how}): the sweep is not in "
        "the regime where too much sparsity could show"
    )
    detail = f"{_regime_text(df, DEGRADE_PAIR)}; {_needs_text(df)}"
    return Outcome(NOT_TESTABLE, f"{why}; {detail}; {reason}", why)


def rule_balance(df: pd.DataFrame) -> Outcome:
    """df: w_importance, w_load, cv_importance, cv_load, max_over_mean_load (means over seeds)."""
    off = df[(df["w_importance"] == 0) & (df["w_load"] == 0)]
    on = df[(df["w_importance"] > 0) & (df["w_load"] > 0)]
    if off.empty or on.empty:
        return Outcome(NOT_RUN, "needs a run with w_importance = w_load = 0 and one with both > 0")
    o = off.iloc[0]
    parts = [
        f"no losses: CV(Imp) {o.cv_importance:.3g}, CV(Load) {o.cv_load:.3g}, max/mean "
        f"{o.max_over_mean_load:.3g}"
    ]
    holds = True
    for r in on.itertuples():
        ok = (
            r.cv_importance <= BALANCE_FACTOR * o.cv_importance
            and r.cv_load <= BALANCE_FACTOR * o.cv_load
            and r.max_over_mean_load < o.max_over_mean_load
        )
        holds &= bool(ok)
        parts.append(
            f"w = {r.w_importance:g}/{r.w_load:g}: CV(Imp) {r.cv_importance:.3g} "
            f"(x{r.cv_importance / o.cv_importance:.2f}), CV(Load) {r.cv_load:.3g} "
            f"(x{r.cv_load / o.cv_load:.2f}), max/mean {r.max_over_mean_load:.3g}"
        )
    return Outcome(REPRODUCED if holds else NOT_REPRODUCED, "; ".join(parts))
