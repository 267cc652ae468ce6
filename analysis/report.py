"""results/REPORT.md: for each claim of the paper, whether our runs reproduce it, with the numbers.

The rules are analysis/rules.py's; here our runs and the paper's own numbers are shaped for them
(the same rule applied to the paper's numbers is a check that it is fair: a rule the paper fails
would be a wrong rule, tested), and the verdicts, the evidence and the regime are rendered.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis import collect, paper, slope, tables, walltime
from analysis.rules import (
    CLAIMS,
    FLOOR_COLUMN,
    NOT_RUN,
    NOT_TESTABLE,
    PAPER_FAILS,
    PAPER_HOLDS,
    PAPER_PAST_UNIGRAM,
    PAPER_SPREAD,
    REGIME_COLUMNS,
    REPRODUCED,
    RULES,
    UNIGRAM_COLUMN,
    Outcome,
    pooled_spread,
    rule_balance,
    rule_degrade,
    rule_gap,
    rule_hier_flat,
    rule_more_experts,
)


@dataclass(frozen=True)
class Verdict:
    key: str
    status: str  # one of STATUSES
    reason: str  # the numbers the status follows from
    paper_status: str  # the same rule on the paper's numbers: PAPER_HOLDS or PAPER_FAILS
    paper_reason: str
    evidence: pd.DataFrame  # our numbers the rule used
    why: str = ""  # NOT_TESTABLE: the short measured reason


# --- our runs and the paper's numbers, shaped for the rules -------------------------------------


def _moe(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["family"].isin(["flat MoE", "hierarchical MoE"])] if not df.empty else df


def _regime(runs: pd.DataFrame, names: list[str]) -> dict[str, str]:
    """{summary column: evidence column} of the regime columns `names` (summary names without
    "regime.") present in runs."""
    out = {}
    for name in names:
        col = name if name == "steps" else f"regime.{name}"
        if col in runs and pd.to_numeric(runs[col], errors="coerce").notna().any():
            out[col] = name
    return out


def _per_model(runs: pd.DataFrame, values: list[str], regime: list[str]) -> pd.DataFrame:
    """collect.per_model with test perplexity's per-model SD (perplexity_sd) and the regime
    columns `regime` (without "regime.")."""
    reg = _regime(runs, regime)
    m = collect.per_model(runs, [*values, *reg], spread=["test_perplexity"])
    return m.rename(columns={"test_perplexity_sd": "perplexity_sd", **reg})


_compute_matched = slope.compute_matched


def more_experts_data(summary: pd.DataFrame) -> pd.DataFrame:
    runs = _compute_matched(collect.sweep(summary, "lm1b"))
    cols = ["model", "num_experts", "ops_per_timestep", "test_perplexity", "perplexity_sd"]
    if runs.empty:
        return pd.DataFrame(columns=[*cols, "n_runs"])
    reg = ["tokens_per_expert_per_step", "tokens_per_parameter"]
    m = _per_model(runs, ["test_perplexity", "ops_per_timestep"], reg)
    return m[[*cols, "n_runs", *[c for c in reg if c in m]]]


def hier_flat_data(summary: pd.DataFrame) -> pd.DataFrame:
    cols = ["sweep", "num_experts", "flat", "flat_sd", "n_flat", "hierarchical", "hier_sd"]
    cols.append("n_hier")
    rows = []
    for name in ("lm1b", "news100b"):
        # the paper's pair (MoE-256 vs MoE-256-h) is at equal compute: a budget model with as many
        # experts but 12x the ops/timestep is no counterpart
        m = collect.per_model(
            _compute_matched(collect.sweep(summary, name)),
            ["test_perplexity", "ops_per_timestep"],
            spread=["test_perplexity"],
        )
        if m.empty:
            continue
        for n, group in m.groupby("num_experts"):
            flat = group[group["family"] == "flat MoE"]
            hier = group[group["family"] == "hierarchical MoE"]
            if flat.empty or hier.empty:
                continue
            f = flat.iloc[0]
            # of several hierarchical models, the one closest in ops/timestep
            h = hier.loc[(hier["ops_per_timestep"] - f["ops_per_timestep"]).abs().idxmin()]
            rows.append(
                {
                    "sweep": name,
                    "num_experts": n,
                    "flat": f["test_perplexity"],
                    "flat_sd": f["test_perplexity_sd"],
                    "n_flat": f["n_runs"],
                    "hierarchical": h["test_perplexity"],
                    "hier_sd": h["test_perplexity_sd"],
                    "n_hier": h["n_runs"],
                }
            )
    return pd.DataFrame(rows, columns=cols)


def gap_data(summary: pd.DataFrame, snapshots: pd.DataFrame) -> pd.DataFrame:
    m = collect.early_late_per_model(
        collect.early_late(summary, snapshots, "news100b"), spread=["gap"]
    )
    m = m.rename(columns={"params_excl_embedding_softmax": "params"})
    out = m[["model", "num_experts", "params", *collect.EARLY_LATE, "gap_sd", "n_runs"]]
    runs = collect.sweep(summary, "news100b")
    reg = _regime(runs, ["tokens_per_parameter", "paper_tokens_per_parameter"])
    if reg and not out.empty:
        r = collect.per_model(runs, list(reg)).rename(columns=reg)
        out = out.merge(r[["model", *reg.values()]], on="model", how="left")
    return out


def degrade_data(summary: pd.DataFrame) -> pd.DataFrame:
    runs = collect.sweep(summary, "news100b")
    reg = [
        "batch_positions",
        "tokens_per_expert_per_step",
        "paper_tokens_per_expert_per_step",
        "tokens_per_parameter",
        "paper_tokens_per_parameter",
    ]
    m = _per_model(runs, ["test_perplexity", "k"], reg)
    cols = ["model", "family", "num_experts", "k", "test_perplexity", "perplexity_sd", "n_runs"]
    return m[[*cols, *[c for c in reg if c in m]]]


def _corpus_value(runs: pd.DataFrame, col: str) -> float | None:
    if col not in runs:
        return None
    v = pd.to_numeric(runs[col], errors="coerce").dropna()
    return float(v.median()) if not v.empty else None


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
        .assign(sweep="lm1b")
    )
    gap = paper.figure3_gap().rename(
        columns={
            "params_excl_embedding_softmax_M": "params",
            "ppl_10B_words": "early_perplexity",
            "ppl_100B_words": "late_perplexity",
        }
    )
    t8 = collect.paper_models("table8", ["test_perplexity_100B_words"])
    t8 = t8.rename(columns={"test_perplexity_100B_words": "test_perplexity"})
    t6 = (
        paper.load("table6")
        .pivot_table(index=["w_importance", "w_load"], columns="metric", values="value")
        .reset_index()
    )
    return {"more_experts": f2, "hier_flat": pairs, "gap": gap, "degrade": t8, "balance": t6}


def _apply(key: str, frame: pd.DataFrame, kw: dict) -> Outcome:
    return RULE_FUNCTIONS[key](frame, **kw)


RULE_FUNCTIONS = {
    "more_experts": rule_more_experts,
    "hier_flat": rule_hier_flat,
    "gap": rule_gap,
    "degrade": rule_degrade,
    "balance": rule_balance,
}


def rule_inputs(summary: pd.DataFrame, snapshots: pd.DataFrame) -> dict[str, tuple]:
    """Per claim (our frame, the rule's keyword arguments: the seed spreads and the corpus)."""
    lm1b, news = collect.sweep(summary, "lm1b"), collect.sweep(summary, "news100b")
    spread = {"lm1b": pooled_spread(lm1b), "news100b": pooled_spread(news)}
    gap_runs = collect.early_late(summary, snapshots, "news100b")
    gap_spread = pooled_spread(gap_runs, "gap", log=False, what="of the gap")
    corpus = {
        "unigram_perplexity": _corpus_value(news, UNIGRAM_COLUMN),
        "floor_nll": _corpus_value(news, FLOOR_COLUMN),
    }
    return {
        "more_experts": (more_experts_data(summary), {"spread": spread["lm1b"]}),
        "hier_flat": (hier_flat_data(summary), {"spreads": spread}),
        "gap": (gap_data(summary, snapshots), {"spread": gap_spread, **corpus}),
        "degrade": (degrade_data(summary), {"spread": spread["news100b"]}),
        "balance": (collect.balance(summary).drop(columns=["run_ids"]), {}),
    }


PAPER_ARGS = {
    "more_experts": {"spread": PAPER_SPREAD},
    "hier_flat": {"spreads": {"lm1b": PAPER_SPREAD}},
    "gap": {"spread": PAPER_SPREAD, "past_unigram": PAPER_PAST_UNIGRAM},
    "degrade": {"spread": PAPER_SPREAD},
    "balance": {},
}


def verdicts(summary: pd.DataFrame, snapshots: pd.DataFrame) -> list[Verdict]:
    """Every claim's verdict on our runs, and the same rule on the paper's numbers."""
    ours = rule_inputs(summary, snapshots)
    theirs = paper_data()
    out = []
    for key in RULE_FUNCTIONS:
        frame, kw = ours[key]
        o = _apply(key, frame, kw)
        p = _apply(key, theirs[key], PAPER_ARGS[key])
        p_status = PAPER_HOLDS if p.status == REPRODUCED else PAPER_FAILS
        out.append(Verdict(key, o.status, o.reason, p_status, p.reason, frame, o.why))
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
    if "model" in summary:  # a model's seeds: same sweep, model and loss weights
        keys = [c for c in ("model", "w_importance", "w_load") if c in summary]
        n = summary.groupby([summary["sweep"].fillna(""), *keys], dropna=False).size()
        seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
        text += f"; runs (seeds) per model: {seeds}"
    uni = _corpus_value(summary, UNIGRAM_COLUMN)
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
        "rule is fair. Rules live in `analysis/rules.py` (`RULES`, `rule_*`).",
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
