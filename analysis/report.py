"""results/REPORT.md: for each claim of the paper, whether our runs reproduce it, with the numbers.

The rules are analysis/rules.py's and return numbers; analysis/evidence.py shapes our runs and the
paper's own numbers for them (the same rule applied to the paper's numbers is a check that it is
fair). Here every result is put into words (`words`), and the verdicts, the evidence and the
regime are rendered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd

from analysis import collect, slope, tables, walltime
from analysis.evidence import (
    PAPER_ARGS,
    REGIME_COLUMNS,
    RULE_FUNCTIONS,
    UNIGRAM_COLUMN,
    corpus_value,
    paper_data,
    rule_inputs,
)
from analysis.rules import (
    BALANCE_FACTOR,
    COMPUTE_MATCH_TOL,
    DEGRADE_PAIR,
    HELPS_UP_TO,
    HIER_FLAT_TOL,
    MIN_TOKENS_PER_EXPERT,
    MORE_EXPERTS_TOL,
    NOT_RUN,
    NOT_TESTABLE,
    PAPER_FAILS,
    PAPER_HOLDS,
    REPRODUCED,
    TRIVIAL_FRACTION,
    Balance,
    Band,
    Degrade,
    Gap,
    HierFlat,
    MoreExperts,
    Result,
    Spread,
    Step,
)

ONE_SEED = "one seed per model: no seed spread measured"
PAPER_ONE_NUMBER = "the paper gives one number per model: no seed spread"
PAPER_PAST_UNIGRAM = "paper: 10B-word snapshot well past unigram (Table 8)"

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


@dataclass(frozen=True)
class Verdict:
    key: str
    status: str  # one of rules.STATUSES
    reason: str  # the numbers the status follows from, in words
    paper_status: str  # the same rule on the paper's numbers: PAPER_HOLDS or PAPER_FAILS
    paper_reason: str
    evidence: pd.DataFrame  # our numbers the rule used
    why: str = ""  # NOT_TESTABLE: the short measured reason
    result: Result | None = None  # the rule's own answer on our runs


def verdicts(summary: pd.DataFrame, snapshots: pd.DataFrame) -> list[Verdict]:
    """Every claim's verdict on our runs, and the same rule on the paper's numbers."""
    ours = rule_inputs(summary, snapshots)
    theirs = paper_data()
    out = []
    for key, rule in RULE_FUNCTIONS.items():
        frame, kw = ours[key]
        o, p = rule(frame, **kw), rule(theirs[key], **PAPER_ARGS[key])
        mine, paper = words(o), words(p)
        p_status = PAPER_HOLDS if p.status == REPRODUCED else PAPER_FAILS
        out.append(Verdict(key, o.status, mine.reason, p_status, paper.reason, frame, mine.why, o))
    return out


# --- the rules' results in words ----------------------------------------------------------------


class Words(NamedTuple):
    """A result in words: the numbers its status follows from, and for NOT_TESTABLE the short
    measured reason (the summary table shows it)."""

    reason: str
    why: str = ""


def words(result: Result) -> Words:
    """A rule's result in words (by its type: each rule returns its own)."""
    return WORDING[type(result)](result)


def spread_text(s: Spread) -> str:
    if s.printed:
        return PAPER_ONE_NUMBER
    if not s.measured:
        return ONE_SEED
    seeds = f"{s.fewest}" if s.fewest == s.most else f"{s.fewest}-{s.most}"
    what = f" {s.what}" if s.what else ""
    models = "model" if s.n_models == 1 else "models"
    sd = f"{s.sd:.1%}" if s.log else f"{s.sd:.3g}"
    return f"seed-to-seed SD{what} {sd} (pooled over {s.n_models} {models}, {seeds} seeds each)"


def band_text(b: Band) -> str:
    if b.two_se is None:
        return f"band {b.floor:.0%} ({spread_text(b.spread)})"
    return (
        f"band {b.value:.1%} = max({b.floor:.0%}, 2·SE {b.two_se:.1%}), SE of a difference of "
        f"means of {_n(b.n_a)} and {_n(b.n_b)} seed(s), {spread_text(b.spread)}"
    )


def _n(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"


def _seq(best: pd.DataFrame) -> str:
    return ", ".join(f"{int(k):,}: {v:.4g}" for k, v in best["test_perplexity"].items())


def _steps(steps: tuple[Step, ...]) -> list[str]:
    return [f"{s.lo:,}→{s.hi:,} experts: {s.change:+.1%}" for s in steps]


def _more_experts_words(r: MoreExperts) -> Words:
    if r.status == NOT_RUN:
        return Words(f"MoE runs at {r.n} expert count(s); the rule needs 2")
    assert r.noise is not None  # set once the rule ran
    n = r.rows.index
    reason = (
        f"perplexity by experts ({_seq(r.rows)}); {n[0]:,}→{n[-1]:,} experts: "
        f"{r.statistic:+.1%}; {band_text(r.noise)}"
    )
    if r.rises:
        reason += "; rises beyond the band: " + "; ".join(_steps(r.rises))
    return Words(reason)


def _hier_flat_words(r: HierFlat) -> Words:
    if r.status == NOT_RUN:
        return Words("no expert count has both a flat and a hierarchical model")
    parts, unresolved = [], []
    for p in r.pairs:
        where = f"{p.sweep} " if p.sweep else ""
        text = (
            f"{where}{int(p.num_experts):,} experts: flat {p.flat:.4g}, hierarchical "
            f"{p.hierarchical:.4g} ({p.change:+.1%}"
        )
        if p.two_se is not None:
            text += f"; 2·SE {p.two_se:.1%} with {_n(p.n_flat)}/{_n(p.n_hier)} seeds"
        if not p.resolved:
            unresolved.append(f"{where}{int(p.num_experts):,} experts: 2·SE {p.two_se:.1%}")
        parts.append(text + ")")
    notes = [f"{s + ': ' if s else ''}{spread_text(spread)}" for s, spread in r.spreads]
    if not any(spread.measured for _, spread in r.spreads):
        notes.append(f"plain ±{HIER_FLAT_TOL:.0%} rule")
    reason = "; ".join(parts) + " — " + "; ".join(notes)
    if r.status != NOT_TESTABLE:
        return Words(reason)
    why = (
        f"2·SE of the flat-hierarchical difference exceeds ±{HIER_FLAT_TOL:.0%} "
        f"({'; '.join(unresolved)}): the seeds cannot resolve {HIER_FLAT_TOL:.0%}"
    )
    return Words(f"{why}; {reason}", why)


def _stage_text(r: Gap) -> str:
    if r.past_unigram:
        return PAPER_PAST_UNIGRAM
    s, fmt = r.stage, tables.fmt
    assert s is not None  # set where the unigram perplexity is known
    floor = (
        f"floor {s.floor:.3g} nats"
        if s.floor_known
        else "floor unknown, taken as 0 nats (stricter)"
    )
    return (
        f"unigram perplexity {s.unigram_perplexity:.4g}, {floor}; N-snapshot perplexities "
        f"{fmt(s.early_min)}-{fmt(s.early_max)}, at most {s.excess:.2f} "
        f"nats above the floor (limit: half the unigram's {2 * s.limit:.2f} = {s.limit:.2f})"
    )


def _gap_noise_text(r: Gap) -> str:
    first, last, fmt = r.first, r.last, tables.fmt
    if r.band is not None:
        assert first is not None and last is not None  # set once the rule ran
        noise = (
            f"largest - smallest {last.gap - first.gap:+.3g} vs 2·SE {r.band:.3g} "
            f"({_n(first.n_runs)}/{_n(last.n_runs)} seeds; {spread_text(r.spread)})"
        )
    else:
        noise = spread_text(r.spread)
    if r.late_ahead is not None:
        assert first is not None and last is not None  # set once the rule ran
        noise += (
            f"; at 10N the largest model {fmt(last.late_perplexity)} vs the smallest "
            f"{fmt(first.late_perplexity)}" + ("" if r.late_ahead else " (behind)")
        )
    return noise


def _gap_words(r: Gap) -> Words:
    if r.status == NOT_RUN:
        return Words(f"{r.n} model(s) with both evaluations; the rule needs 3")
    assert r.first is not None and r.last is not None  # set once the rule ran
    fmt = tables.fmt
    reason = (
        f"gaps by increasing size: {', '.join(fmt(g) for g in r.gaps)}; slope "
        f"{r.statistic:+.3g} per decade of parameters; largest {fmt(r.last.gap)} vs smallest "
        f"{fmt(r.first.gap)}"
    )
    if r.case == "unknown unigram":
        why = "the corpus's unigram perplexity is unknown"
        return Words(
            f"{why} (summary column {UNIGRAM_COLUMN}): no check that the N snapshot is past the "
            f"unigram stage; {reason}",
            why,
        )
    stage = _stage_text(r)
    if r.case == "unigram stage":
        s = r.stage
        assert s is not None  # the case is decided by it
        why = (
            f"at N tokens the models are still near the unigram stage: N-snapshot perplexity "
            f"up to {fmt(s.early_max)} vs unigram {s.unigram_perplexity:.4g}, "
            f"{s.excess:.2f} nats above the floor where the limit is {s.limit:.2f}"
        )
        return Words(f"{why}; {stage}; {reason}", why)
    return Words(f"{stage}; {reason}; {_gap_noise_text(r)}")


_MEASURE_LABELS = {
    "tokens_per_expert_per_step": "tokens per expert per step",
    "tokens_per_parameter": "tokens per parameter",
}


def _regime_text(r: Degrade) -> str:
    """The large models' tokens per expert per step and tokens per parameter, with the paper's."""
    assert r.regime is not None  # set for every case that words it
    if r.regime.measures is None:
        return (
            "the summary has no regime columns (regime.tokens_per_expert_per_step, "
            "regime.tokens_per_parameter; collected before they were recorded): tokens per expert "
            "per step and tokens per parameter unknown"
        )
    parts = []
    for m in r.regime.measures:
        label = _MEASURE_LABELS[m.column]
        if m.values is None:
            parts.append(f"{label}: unknown")
            continue
        vals = [
            f"{n:,} experts {tables.fmt(ours)}"
            + ("" if paper is None else f" (paper {tables.fmt(paper)})")
            for n, ours, paper in m.values
        ]
        parts.append(f"{label}: " + ", ".join(vals))
    return "; ".join(parts)


def _at_pair_text(r: Degrade) -> str:
    """What the sweep's batch would give the pair's experts per step, beside App. D's."""
    g = r.regime
    assert g is not None  # set for every case that words it
    if g.batch is None:
        return "the sweep's batch is unknown (no regime columns)"
    parts = [f"{n:,} experts {ours:.2g} (paper {paper:.0f})" for n, ours, paper in g.at_pair]
    return (
        f"at this sweep's {g.batch:,.0f} positions per step, tokens per expert per step: "
        + ", ".join(parts)
    )


def _needs_text(r: Degrade) -> str:
    """The batch a test of claim 4 needs (App. D's regime)."""
    g = r.regime
    assert g is not None  # set for every case that words it
    text = (
        f"a test needs a batch giving >= ~{MIN_TOKENS_PER_EXPERT} tokens per expert per step at "
        f"{DEGRADE_PAIR[1]:,} experts, i.e. >= {g.needs_positions:,.0f} positions per step at "
        f"k = {g.needs_k:g}, as the paper's ~2.5M-word batch (App. D; "
        f"~{g.paper_tokens_per_expert:.0f} tokens per expert per step)"
    )
    if g.run_positions is not None:
        text += f"; this run: {g.run_positions:,.0f} positions per step"
    return text


def _degrade_words(r: Degrade) -> Words:
    lo, hi = DEGRADE_PAIR
    run = ", ".join(f"{int(n):,}" for n in r.counts) or "none"
    if r.case == "pair missing":
        return Words(f"needs {lo:,} and {hi:,} experts; run: {run}")
    if r.case == "short":
        why = f"the sweep stops at {r.largest:,} experts, short of {lo:,} and {hi:,}"
        return Words(f"{why} (run: {run}); {_at_pair_text(r)}; {_needs_text(r)}", why)
    if r.case == "no helps":
        return Words(
            f"needs {HELPS_UP_TO:,} experts and a smaller MoE too (to see that more experts help "
            f"up to there); run: {run}"
        )
    assert r.noise is not None  # set once the rule ran
    reason = (
        f"perplexity by experts ({_seq(r.rows)}); {r.smallest:,}→{HELPS_UP_TO:,} experts: "
        f"{r.fall:+.1%}; {lo:,}→{hi:,} experts: {r.statistic:+.1%}; {band_text(r.noise)}"
    )
    if r.case != "not helping":
        return Words(reason)
    how = f"{r.smallest:,}→{HELPS_UP_TO:,} experts {r.fall:+.1%}"
    if r.rises:
        how += ", rises beyond the band at " + ", ".join(_steps(r.rises))
    why = (
        f"more experts do not help up to {HELPS_UP_TO:,} experts ({how}): the sweep is not in "
        "the regime where too much sparsity could show"
    )
    return Words(f"{why}; {_regime_text(r)}; {_needs_text(r)}; {reason}", why)


def _balance_words(r: Balance) -> Words:
    if r.status == NOT_RUN:
        return Words("needs a run with w_importance = w_load = 0 and one with both > 0")
    cv_imp, cv_load, max_mean = r.off
    parts = [f"no losses: CV(Imp) {cv_imp:.3g}, CV(Load) {cv_load:.3g}, max/mean {max_mean:.3g}"]
    parts += [
        f"w = {x.w_importance:g}/{x.w_load:g}: CV(Imp) {x.cv_importance:.3g} "
        f"(x{x.importance_ratio:.2f}), CV(Load) {x.cv_load:.3g} (x{x.load_ratio:.2f}), max/mean "
        f"{x.max_over_mean_load:.3g}"
        for x in r.on
    ]
    return Words("; ".join(parts))


WORDING: dict[type[Result], Callable[[Any], Words]] = {
    MoreExperts: _more_experts_words,
    HierFlat: _hier_flat_words,
    Gap: _gap_words,
    Degrade: _degrade_words,
    Balance: _balance_words,
}


# --- REPORT.md -----------------------------------------------------------------------------------


def _inputs(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "No finished runs were collected.\n"
    counts = summary.groupby(summary["sweep"].fillna("").replace("", "(none)")).size()
    lines = ", ".join(f"{name}: {n}" for name, n in counts.items())
    corpora = sorted(set(summary.get("corpus.corpus", pd.Series(dtype=str)).dropna()))
    text = f"{len(summary)} finished runs (by sweep: {lines})"
    if corpora:
        text += f", corpus: {', '.join(map(str, corpora))}"
    if "model" in summary:  # a model's seeds: same sweep, model and loss weights
        keys = [c for c in ("model", "w_importance", "w_load") if c in summary]
        n = summary.groupby([summary["sweep"].fillna(""), *keys], dropna=False).size()
        seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
        text += f"; runs (seeds) per model: {seeds}"
    uni = corpus_value(summary, UNIGRAM_COLUMN)
    text += "; the corpus's unigram perplexity: " + (f"{uni:.4g}" if uni else "unknown")
    return text + ".\n"


def _cell(v: Verdict) -> str:
    return f"**{v.status}** ({v.why})" if v.status == NOT_TESTABLE and v.why else f"**{v.status}**"


def regime_tables(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per sweep, per model (means over seeds): batch positions, steps, tokens per expert per
    step and tokens per parameter, each beside the paper's (the columns summary.csv has)."""
    out: dict[str, pd.DataFrame] = {}
    if summary.empty or "sweep" not in summary:
        return out
    cols = [c for c in REGIME_COLUMNS if c in summary]
    for name in sorted(set(summary["sweep"].fillna("")) - {""}):
        runs = collect.sweep(summary, name)
        m = collect.per_model(runs, cols)
        keep = ["model", "num_experts", "n_runs", *cols]
        out[name] = m[keep].rename(columns=REGIME_COLUMNS)
    return out


def _regime_section(summary: pd.DataFrame) -> list[str]:
    out = [
        "",
        "## Regime: batch, steps and tokens beside the paper's",
        "",
        "Per model, means over seeds, from `summary.csv`'s `regime.*` columns: positions per "
        "training step, steps, tokens each expert receives per step and training tokens per "
        "parameter, each beside the paper's counterpart (– where it has none). The sparsity "
        "claims (3, 4) depend on these, not on the parameter count alone.",
    ]
    missing = [c for c in REGIME_COLUMNS if c not in summary]
    if missing:
        out += ["", "Not in `summary.csv` (collected before recorded): " + ", ".join(missing) + "."]
    for name, t in regime_tables(summary).items():
        out += ["", f"### {name}", "", tables.to_markdown(t).rstrip()]
    return out


def _walltime_section(summary: pd.DataFrame) -> list[str]:
    sweeps = walltime.per_sweep(summary)
    if sweeps.empty:
        return []
    total = sweeps["core-min"].sum()
    return [
        "",
        "## Wall time: the training jobs, and on more cores",
        "",
        f"{int(sweeps['jobs'].sum())} training jobs, {total:.0f} core-minutes in all (each job one "
        "process on `threads_per_run` cores; `wall_time_s` of `summary.csv`).",
        "",
        tables.to_markdown(sweeps).rstrip(),
        "",
        "The same jobs scheduled longest first on single-thread workers (`analysis/walltime.py`: "
        "without the memory budget, the benchmark and the analysis; Snakemake does not start "
        "jobs longest first, so a real run can take longer):",
        "",
        tables.to_markdown(walltime.projection(summary)).rstrip(),
    ]


def slope_lines(summary: pd.DataFrame) -> list[str]:
    """Claim 1 as a number (analysis/slope.py): the slope of ln(perplexity) against ln(experts)
    at equal compute, ours with its bootstrap interval over seeds beside the paper's."""
    mine, theirs = slope.ours(summary), slope.paper_slope(paper_data()["more_experts"])
    text = "too few compute-matched MoE models" if mine is None else mine.describe()
    paper_text = "–" if theirs is None else theirs.describe()
    return [
        "- Slope of ln(perplexity) against ln(experts) at equal compute (least squares over the "
        "models above, each at the mean of its seeds):",
        f"  this run {text}; the paper (Table 7, after 10 epochs) {paper_text}.",
    ]


def render(verdict_list: list[Verdict], summary: pd.DataFrame) -> str:
    """REPORT.md's text."""
    out = [
        "# Reproduction report",
        "",
        "Written by `python -m analysis figures` from `summary.csv` and `snapshots.csv`; the",
        "figures are in `figures/`, the tables in `tables/`. " + _inputs(summary),
        "Our perplexities are not on the paper's corpora or budgets, so no rule compares absolute",
        "numbers: each compares our runs with each other, as the paper compares its models. Every",
        'rule is also applied to the paper\'s own numbers ("paper, same rule"), a check that the',
        "rule is fair. The rules compute in `analysis/rules.py` (`rule_*`); `analysis/report.py`",
        "words them (`RULES`).",
        "",
        "A model's runs (seeds) are averaged. Where models have >= 2 seeds, a change counts only",
        "beyond 2 standard errors of the seed-to-seed spread (pooled over the sweep's models).",
        f"**{NOT_TESTABLE}**: the runs cannot decide the claim (seed noise wider than the",
        "tolerance, models still at the unigram stage, or more experts not helping at all); the",
        f"reason gives the measurement. **{NOT_RUN}**: the runs the rule needs are missing.",
        "",
        "| claim | paper source | paper, same rule | this run |",
        "|---|---|---|---|",
    ]
    for v in verdict_list:
        claim, source = CLAIMS[v.key]
        out.append(f"| {claim} | {source} | {v.paper_status} | {_cell(v)} |")
    for i, v in enumerate(verdict_list, 1):
        claim, source = CLAIMS[v.key]
        out += [
            "",
            f"## {i}. {claim}",
            "",
            f"Source: {source}.",
            "",
            f"Rule: {RULES[v.key]}",
            "",
            f"- Paper, same rule: {v.paper_status} ({v.paper_reason}).",
            f"- This run: **{v.status}** ({v.reason}).",
        ]
        if v.key == "more_experts":
            out += slope_lines(summary)
        if not v.evidence.empty:
            out += ["", tables.to_markdown(v.evidence).rstrip()]
    out += _regime_section(summary)
    out += _walltime_section(summary)
    return "\n".join(out) + "\n"
