"""results/REPORT.md: for each claim of the paper, whether our runs reproduce it, with the numbers.

Each claim has one explicit rule (`rule_*`, a pure function of a small frame) that returns
(True / False / None = not run, the numbers behind it). The same rule is applied to the paper's
own numbers as a check that it is fair: a rule the paper fails would be a wrong rule (tested).
Absolute perplexities are not compared (our corpus and budgets are not the paper's); every rule
compares our runs with each other, as the paper compares its models.

Claims (Sec. 5.1-5.2, App. A): more experts give lower perplexity at equal compute (Fig. 2-left, Table 7);
hierarchical MoE matches flat MoE (Table 7); the gap between N and 10N tokens widens with
capacity (Fig. 3, Table 8); quality degrades at 131072 experts (Table 8); the balancing losses
fix the load imbalance (Table 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import collect, paper, tables

REPRODUCED, NOT_REPRODUCED, NOT_RUN = "reproduced", "not reproduced", "not run"
PAPER_HOLDS, PAPER_FAILS = "holds", "fails"  # the rule on the paper's own numbers
MORE_EXPERTS_TOL = 0.01  # a relative perplexity change within ±1% counts as "no change"
COMPUTE_MATCH_TOL = 0.25  # "equal compute": ops/timestep within ±25% of the sweep's MoE median
HIER_FLAT_TOL = 0.03  # "matches": within ±3% (the paper's MoE-256-h vs MoE-256 is +0.8%)
BALANCE_FACTOR = 0.5  # "fixes": each CV at most half of the CV without the losses
DEGRADE_PAIR = (65536, 131072)

RULES = {
    "more_experts": (
        "Take the MoE runs (flat and hierarchical) of the lm1b sweep whose ops/timestep is within "
        f"±{COMPUTE_MATCH_TOL:.0%} of the sweep's median MoE ops/timestep; per expert count, the "
        "lowest test perplexity (mean over seeds). Reproduced iff the largest expert count is more "
        f"than {MORE_EXPERTS_TOL:.0%} lower than the smallest, and no step to the next larger "
        f"expert count raises perplexity by more than {MORE_EXPERTS_TOL:.0%}. Needs >= 2 expert "
        "counts."
    ),
    "hier_flat": (
        "For every expert count with both a flat and a hierarchical model in the same sweep "
        "(lm1b, news100b), compare their test perplexities (means over seeds). Reproduced iff "
        f"every hierarchical one is within ±{HIER_FLAT_TOL:.0%} of its flat counterpart. Needs "
        ">= 1 pair."
    ),
    "gap": (
        "In the news100b sweep, gap = test perplexity at the earliest snapshot (N tokens) minus "
        "at the final evaluation (10N), per model. Reproduced iff the least-squares slope of gap "
        "against log10(parameters excl. embedding and softmax) is positive and the largest model's "
        "gap exceeds the smallest model's. A non-monotonic gap can pass (the paper's does: 8.1 at "
        "MoE-32, 7.5 at MoE-256-h). Needs >= 3 models."
    ),
    "degrade": (
        "In the news100b sweep, compare the final test perplexity of the 131072-expert and the "
        "65536-expert models. Reproduced iff 131072 experts is worse (higher). Needs both."
    ),
    "balance": (
        "In the balance sweep, compare every run with both w_importance > 0 and w_load > 0 with "
        "the run without the losses (w_importance = w_load = 0). Reproduced iff each of them has "
        f"CV(Importance) and CV(Load) at most {BALANCE_FACTOR:g}x the no-loss run's and a lower "
        "max/mean load. Needs the no-loss run and >= 1 run with both losses."
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


@dataclass(frozen=True)
class Verdict:
    key: str
    status: str  # REPRODUCED, NOT_REPRODUCED or NOT_RUN
    reason: str  # the numbers the status follows from
    paper_status: str  # the same rule on the paper's numbers: PAPER_HOLDS or PAPER_FAILS
    paper_reason: str
    evidence: pd.DataFrame  # our numbers the rule used


def _status(holds: bool | None) -> str:
    return NOT_RUN if holds is None else (REPRODUCED if holds else NOT_REPRODUCED)


# --- the rules ----------------------------------------------------------------------------------


def rule_more_experts(df: pd.DataFrame) -> tuple[bool | None, str]:
    """df: num_experts, test_perplexity (one row per model)."""
    best = df.groupby("num_experts")["test_perplexity"].min().sort_index()
    if len(best) < 2:
        return None, f"MoE runs at {len(best)} expert count(s); the rule needs 2"
    n, p = best.index.to_numpy(), best.to_numpy()
    change = p[-1] / p[0] - 1
    rises = [
        f"{n[i]:,}→{n[i + 1]:,} experts: {p[i + 1] / p[i] - 1:+.1%}"
        for i in range(len(p) - 1)
        if p[i + 1] > p[i] * (1 + MORE_EXPERTS_TOL)
    ]
    seq = ", ".join(f"{k:,}: {v:.4g}" for k, v in best.items())
    reason = f"perplexity by experts ({seq}); {n[0]:,}→{n[-1]:,} experts: {change:+.1%}"
    if rises:
        reason += f"; rises above {MORE_EXPERTS_TOL:.0%}: " + "; ".join(rises)
    return bool(change < -MORE_EXPERTS_TOL and not rises), reason


def rule_hier_flat(pairs: pd.DataFrame) -> tuple[bool | None, str]:
    """pairs: num_experts, flat, hierarchical (test perplexities)."""
    if pairs.empty:
        return None, "no expert count has both a flat and a hierarchical model"
    rel = pairs["hierarchical"] / pairs["flat"] - 1
    parts = [
        f"{int(r.num_experts):,} experts: flat {r.flat:.4g}, hierarchical {r.hierarchical:.4g} "
        f"({d:+.1%})"
        for r, d in zip(pairs.itertuples(), rel, strict=True)
    ]
    return bool((rel.abs() <= HIER_FLAT_TOL).all()), "; ".join(parts)


def rule_gap(df: pd.DataFrame) -> tuple[bool | None, str]:
    """df: params (any unit), gap (one row per model)."""
    df = df.sort_values("params")
    if len(df) < 3:
        return None, f"{len(df)} model(s) with both evaluations; the rule needs 3"
    slope = float(np.polyfit(np.log10(df["params"].to_numpy(float)), df["gap"], 1)[0])
    first, last = df["gap"].iloc[0], df["gap"].iloc[-1]
    seq = ", ".join(tables.fmt(g) for g in df["gap"])
    reason = (
        f"gaps by increasing size: {seq}; slope {slope:+.3g} per decade of parameters; "
        f"largest {tables.fmt(last)} vs smallest {tables.fmt(first)}"
    )
    return bool(slope > 0 and last > first), reason


def rule_degrade(df: pd.DataFrame) -> tuple[bool | None, str]:
    """df: num_experts, test_perplexity (final; one row per model)."""
    have = dict(zip(df["num_experts"], df["test_perplexity"], strict=True))
    lo, hi = DEGRADE_PAIR
    if lo not in have or hi not in have:
        counts = ", ".join(f"{int(n):,}" for n in sorted(have)) or "none"
        return None, f"needs {lo:,} and {hi:,} experts; run: {counts}"
    change = have[hi] / have[lo] - 1
    return bool(have[hi] > have[lo]), (
        f"{lo:,} experts: {have[lo]:.4g}; {hi:,} experts: {have[hi]:.4g} ({change:+.1%})"
    )


def rule_balance(df: pd.DataFrame) -> tuple[bool | None, str]:
    """df: w_importance, w_load, cv_importance, cv_load, max_over_mean_load."""
    off = df[(df["w_importance"] == 0) & (df["w_load"] == 0)]
    on = df[(df["w_importance"] > 0) & (df["w_load"] > 0)]
    if off.empty or on.empty:
        return None, "needs a run with w_importance = w_load = 0 and one with both > 0"
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
    return holds, "; ".join(parts)


# --- our runs and the paper's numbers, shaped for the rules -------------------------------------


def _moe(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["family"].isin(["flat MoE", "hierarchical MoE"])] if not df.empty else df


def more_experts_data(summary: pd.DataFrame) -> pd.DataFrame:
    runs = _moe(collect.sweep(summary, "lm1b"))
    if runs.empty:
        return pd.DataFrame(columns=["model", "num_experts", "ops_per_timestep", "test_perplexity"])
    ops = runs["ops_per_timestep"]
    runs = runs[(ops / ops.median() - 1).abs() <= COMPUTE_MATCH_TOL]
    m = collect.per_model(runs, ["test_perplexity", "ops_per_timestep"])
    return m[["model", "num_experts", "ops_per_timestep", "test_perplexity", "n_runs"]]


def hier_flat_data(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in ("lm1b", "news100b"):
        m = collect.per_model(_moe(collect.sweep(summary, name)), ["test_perplexity"])
        if m.empty:
            continue
        w = m.pivot_table(index="num_experts", columns="family", values="test_perplexity")
        if {"flat MoE", "hierarchical MoE"} <= set(w.columns):
            w = w.dropna(subset=["flat MoE", "hierarchical MoE"])
            rows += [
                {
                    "sweep": name,
                    "num_experts": n,
                    "flat": r["flat MoE"],
                    "hierarchical": r["hierarchical MoE"],
                }
                for n, r in w.iterrows()
            ]
    return pd.DataFrame(rows, columns=["sweep", "num_experts", "flat", "hierarchical"])


def gap_data(summary: pd.DataFrame, snapshots: pd.DataFrame) -> pd.DataFrame:
    m = collect.early_late_per_model(collect.early_late(summary, snapshots, "news100b"))
    m = m.rename(columns={"params_excl_embedding_softmax": "params"})
    return m[["model", "num_experts", "params", *collect.EARLY_LATE, "n_runs"]]


def degrade_data(summary: pd.DataFrame) -> pd.DataFrame:
    m = collect.per_model(collect.sweep(summary, "news100b"), ["test_perplexity"])
    return m[["model", "num_experts", "test_perplexity", "n_runs"]]


def paper_data() -> dict[str, pd.DataFrame]:
    """Each rule's input from the paper's tables (analysis.paper)."""
    f2 = paper.figure2_left_series()
    f2 = f2[f2["series"] != "baseline"].assign(
        num_experts=lambda d: d["model"].str.extract(r"MoE-(\d+)")[0].astype(int),
        test_perplexity=lambda d: d["test_perplexity_10_epochs"],
    )
    pairs = f2.pivot_table(index="num_experts", columns="series", values="test_perplexity")
    pairs = (
        pairs.dropna()
        .reset_index()
        .rename(columns={"flat MoE": "flat", "hierarchical MoE": "hierarchical"})
    )
    gap = paper.figure3_gap().rename(columns={"params_excl_embedding_softmax_M": "params"})
    t8 = collect.paper_models("table8", ["test_perplexity_100B_words"])
    t8 = t8.rename(columns={"test_perplexity_100B_words": "test_perplexity"})
    t6 = (
        paper.load("table6")
        .pivot_table(index=["w_importance", "w_load"], columns="metric", values="value")
        .reset_index()
    )
    return {"more_experts": f2, "hier_flat": pairs, "gap": gap, "degrade": t8, "balance": t6}


RULE_FUNCTIONS = {
    "more_experts": rule_more_experts,
    "hier_flat": rule_hier_flat,
    "gap": rule_gap,
    "degrade": rule_degrade,
    "balance": rule_balance,
}


def verdicts(summary: pd.DataFrame, snapshots: pd.DataFrame) -> list[Verdict]:
    """Every claim's verdict on our runs, and the same rule on the paper's numbers."""
    ours = {
        "more_experts": more_experts_data(summary),
        "hier_flat": hier_flat_data(summary),
        "gap": gap_data(summary, snapshots),
        "degrade": degrade_data(summary),
        "balance": collect.balance(summary).drop(columns=["run_ids"]),
    }
    theirs = paper_data()
    out = []
    for key, rule in RULE_FUNCTIONS.items():
        holds, reason = rule(ours[key])
        p_holds, p_reason = rule(theirs[key])
        p_status = PAPER_HOLDS if p_holds else PAPER_FAILS
        out.append(Verdict(key, _status(holds), reason, p_status, p_reason, ours[key]))
    return out


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
    return text + ".\n"


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
        "rule is fair. Rules live in `analysis/report.py` (`RULES`, `rule_*`).",
        "",
        "| claim | paper source | paper, same rule | this run |",
        "|---|---|---|---|",
    ]
    for v in verdict_list:
        claim, source = CLAIMS[v.key]
        out.append(f"| {claim} | {source} | {v.paper_status} | **{v.status}** |")
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
        if not v.evidence.empty:
            out += ["", tables.to_markdown(v.evidence).rstrip()]
    return "\n".join(out) + "\n"
