"""Our runs and the paper's own numbers, shaped for the claims' rules (analysis/rules.py): per
claim the frame the rule reads and its keyword arguments (the seed spreads, the corpus). The same
rule applied to the paper's numbers (Tables 6-8, Fig. 2-left, Fig. 3) is a check that it is fair:
a rule the paper fails would be a wrong rule, tested. analysis/report.py words the results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis import collect, paper, slope
from analysis.rules import (
    PAPER_SPREAD,
    Result,
    pooled_spread,
    rule_balance,
    rule_degrade,
    rule_gap,
    rule_hier_flat,
    rule_more_experts,
)
from moe_impl.runs.runsummary import UNIGRAM_PERPLEXITY, column

# summary.csv's columns of summary.json's fields (moe_impl/runs/runsummary.py names them)
UNIGRAM_COLUMN, FLOOR_COLUMN = column("corpus", UNIGRAM_PERPLEXITY), column("floor_nll")
# the regime columns (absent in summaries collected before they were recorded)
REGIME_COLUMNS = {
    column("regime", "batch_positions"): "batch positions",
    column("regime", "paper_batch_positions"): "batch positions (paper)",
    column("steps"): "steps",
    column("regime", "paper_steps"): "steps (paper)",
    column("regime", "tokens_per_expert_per_step"): "tokens/expert/step",
    column("regime", "paper_tokens_per_expert_per_step"): "tokens/expert/step (paper)",
    column("regime", "tokens_per_parameter"): "tokens/parameter",
    column("regime", "paper_tokens_per_parameter"): "tokens/parameter (paper)",
}


def _regime(runs: pd.DataFrame, names: list[str]) -> dict[str, str]:
    """{summary column: evidence column} of the regime columns `names` (the fields of summary.json's
    "regime", or "steps") present in runs."""
    out = {}
    for name in names:
        col = column(name) if name == "steps" else column("regime", name)
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


def corpus_value(runs: pd.DataFrame, col: str) -> float | None:
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


RULE_FUNCTIONS: dict[str, Callable[..., Result]] = {
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
        "unigram_perplexity": corpus_value(news, UNIGRAM_COLUMN),
        "floor_nll": corpus_value(news, FLOOR_COLUMN),
    }
    return {
        "more_experts": (more_experts_data(summary), {"spread": spread["lm1b"]}),
        "hier_flat": (hier_flat_data(summary), {"spreads": spread}),
        "gap": (gap_data(summary, snapshots), {"spread": gap_spread, **corpus}),
        "degrade": (degrade_data(summary), {"spread": spread["news100b"]}),
        "balance": (collect.balance(summary).drop(columns=["run_ids"]), {}),
    }


PAPER_ARGS: dict[str, dict[str, Any]] = {
    "more_experts": {"spread": PAPER_SPREAD},
    "hier_flat": {"spreads": {"lm1b": PAPER_SPREAD}},
    "gap": {"spread": PAPER_SPREAD, "past_unigram": True},
    "degrade": {"spread": PAPER_SPREAD},
    "balance": {},
}
