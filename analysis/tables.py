"""Our analogues of the paper's Tables 6, 7 and 8, with the paper's values in adjacent columns.

Table 7 (App. C, 1B Word) from the `lm1b` sweep, Table 8 (App. D, 100B words) from the
`news100b` sweep, Table 6 (App. A) from the `balance` sweep. Rows are an outer
join on the model (or the loss weights): a paper row we did not run keeps empty "this run" cells,
and a run with no paper counterpart keeps empty "paper" cells. Our numbers are means over the
runs (seeds) of a model. Pure: frames in, frames or text out (analysis/io.py writes the files).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import collect, paper

MISSING = "–"


def _paper_wide(table: str, metrics: list[str]) -> pd.DataFrame:
    w = collect.paper_models(table, metrics)
    # NOTE: "*" (Jozefowicz et al.) stays: our LSTM-256-64 stands for the re-run LSTM-2048-512
    return w.assign(paper_model=w["model"], paper_order=np.arange(len(w)))


# Tables 7 and 8's shared columns (source column -> label): the model's, which open each table,
# the sizes (this run in millions beside the paper's) and the throughput
_MODEL_COLS = {
    "paper_model": "paper model",
    "model": "this run's model",
    "num_experts": "experts",
    "n_runs": "runs",
}
_SIZE_COLS = {
    "params_M": "params excl. emb. & softmax, M (this run)",
    "params_excl_embedding_softmax_M": "params excl. emb. & softmax, M (paper)",
    "ops_M": "ops/timestep, M (this run)",
    "ops_per_timestep_M": "ops/timestep, M (paper)",
}
_TFLOPS_COLS = {
    "tflops_per_device": "TFLOPS/device (this run)",
    "tflops_per_gpu": "TFLOPS/GPU (paper)",
}


def _join(ours: pd.DataFrame, theirs: pd.DataFrame, cols: dict[str, str]) -> pd.DataFrame:
    """Outer join of our per-model rows and the paper's on paper_model (experts: the paper's);
    paper order first, then our extra models by experts. Columns: _MODEL_COLS, then `cols`."""
    ours = ours.drop(columns=["num_experts"]).assign(
        ops_M=ours["ops_per_timestep"] / 1e6,
        params_M=ours["params_excl_embedding_softmax"] / 1e6,
    )
    cols = {**_MODEL_COLS, **cols}
    out = theirs.merge(ours, on="paper_model", how="outer", suffixes=("_paper", ""))
    out["model"] = out["model"].fillna(MISSING)
    order = out["paper_order"].fillna(1e9 + out["num_experts"].fillna(0))
    out = out.assign(_o=order).sort_values(["_o", "model"], kind="stable")
    out = out[list(cols)].rename(columns=cols).reset_index(drop=True)
    return out


def table7(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 7 analogue: the ~8M-ops models of App. C.1 and our `lm1b` sweep."""
    ours = collect.per_model(
        collect.sweep(summary, "lm1b"),
        [
            "test_perplexity",
            "train_tokens",
            "ops_per_timestep",
            "params_excl_embedding_softmax",
            "tflops_per_device",
            "mfu",
        ],
    )
    theirs = _paper_wide(
        "table7",
        [
            "test_perplexity_10_epochs",
            "ops_per_timestep_M",
            "params_excl_embedding_softmax_M",
            "tflops_per_gpu",
        ],
    )
    theirs = theirs[theirs["ops_per_timestep_M"] < 12]  # Figure 2-left's budget (C.1 models)
    theirs = theirs[~theirs["model"].str.endswith("*") | theirs["model"].eq("LSTM-2048-512*")]
    theirs = theirs.assign(mfu_paper=theirs["tflops_per_gpu"] / collect.K40_PEAK_TFLOPS)
    return _join(
        ours,
        theirs,
        {
            "test_perplexity": "test ppl (this run)",
            "test_perplexity_10_epochs": "test ppl, 10 epochs (paper)",
            # the lm1b sweep's Fig. 2-right budget models train fewer tokens than the rest
            "train_tokens": "training tokens (this run)",
            **_SIZE_COLS,
            **_TFLOPS_COLS,
            "mfu": "MFU (this run)",
            "mfu_paper": "MFU, TFLOPS/4.29 (paper)",
        },
    )


def table8(summary: pd.DataFrame, snapshots: pd.DataFrame) -> pd.DataFrame:
    """Table 8 analogue: App. D's models and our `news100b` sweep after N and 10N tokens."""
    runs = collect.sweep(summary, "news100b")
    ours = collect.per_model(
        runs, ["params_excl_embedding_softmax", "ops_per_timestep", "tflops_per_device"]
    )
    el = collect.per_model(
        collect.early_late(summary, snapshots, "news100b"),
        collect.EARLY_LATE,
    )
    el = el.drop(columns=["family", "model", "moe", "num_experts", "n_runs"])
    ours = ours.merge(el, on="paper_model", how="left")
    theirs = _paper_wide(
        "table8",
        [
            "test_perplexity_10B_words",
            "test_perplexity_100B_words",
            "ops_per_timestep_M",
            "params_excl_embedding_softmax_M",
            "tflops_per_gpu",
        ],
    )
    theirs["gap_paper"] = theirs["test_perplexity_10B_words"] - theirs["test_perplexity_100B_words"]
    return _join(
        ours,
        theirs,
        {
            **_SIZE_COLS,
            "early_tokens": "N tokens (this run)",
            "early_perplexity": "test ppl after N (this run)",
            "test_perplexity_10B_words": "test ppl after 10B words (paper)",
            "late_tokens": "final tokens (this run)",
            "late_perplexity": "test ppl at the end (this run)",
            "test_perplexity_100B_words": "test ppl after 100B words (paper)",
            "gap": "gap (this run)",
            "gap_paper": "gap (paper)",
            **_TFLOPS_COLS,
        },
    )


def table6(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 6 analogue: the balancing-loss ablation, per (w_importance, w_load)."""
    ours = collect.balance(summary).drop(columns=["run_ids"])
    t6 = paper.load("table6")
    theirs = t6.pivot_table(index=["w_importance", "w_load"], columns="metric", values="value")
    theirs = theirs.add_suffix("_paper").reset_index()
    out = theirs.merge(ours, on=["w_importance", "w_load"], how="outer")
    out = out.sort_values(["w_importance", "w_load"]).reset_index(drop=True)
    cols = {"w_importance": "w_importance", "w_load": "w_load", "n_runs": "runs"}
    for key, label in (
        ("test_perplexity", "test ppl"),
        ("cv_importance", "CV(Importance)"),
        ("cv_load", "CV(Load)"),
        ("max_over_mean_load", "max/mean load"),
    ):
        cols[key] = f"{label} (this run)"
        paper_key = "test_perplexity_10_epochs" if key == "test_perplexity" else key
        cols[f"{paper_key}_paper"] = f"{label} (paper)"
    return out[list(cols)].rename(columns=cols)


def fmt(value) -> str:
    """A table cell: "–" for missing, integers with separators, else 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, str):
        return value
    v = float(value)
    if v.is_integer() and abs(v) >= 1:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.1f}"
    return f"{v:.4g}"


def _numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def to_markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---:" if _numeric(df[c]) else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


_TEX = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "–": "--", "÷": r"$\div$"}


def _tex(text: str) -> str:
    for a, b in _TEX.items():
        text = text.replace(a, b)
    return text


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    align = "".join("r" if _numeric(df[c]) else "l" for c in df.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        f"\\caption{{{_tex(caption)}}}",
        f"\\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(_tex(c) for c in df.columns) + r" \\",
        r"\midrule",
    ]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(_tex(fmt(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


CAPTIONS = {
    "table6": "Table 6 analogue: balancing-loss ablation (App. A), this run beside the paper",
    "table7": "Table 7 analogue: 1B-Word-style models at matched ops/timestep (App. C.1)",
    "table8": "Table 8 analogue: 100B-word-style models after N and 10N tokens (App. D)",
}


def all_tables(summary: pd.DataFrame, snapshots: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {
        "table6": table6(summary),
        "table7": table7(summary),
        "table8": table8(summary, snapshots),
    }
