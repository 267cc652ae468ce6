"""The paper's published numbers (Shazeer et al. 2017) as tidy frames, and the figure series.

Reads only the CSVs packaged in `analysis/paper_data/` (see its README.md for the columns and
where each number comes from). Figures 2 and 3 have no data of their own: their points are Table
7 and Table 8 rows, selected here as the figures' captions and Sec. 5.1-5.2 describe them.
"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

PAPER_TABLES = tuple(f"table{i}" for i in range(1, 9))  # Tables 1-8 (1-4 and 5 are MT, 6 ablation)
COLUMNS = ["source", "corpus", "model", "preset", "setting", "metric", "value", "printed", "note"]

_PEERS_INT = ["source_line", "num_experts", "tokens", "d_model", "d_hidden", "k", "threads", "reps"]
_PEERS_INT += ["group"]

# Figure 2-left (1B Word, ~8M ops/timestep, 10 epochs): x = params excl. embedding and softmax.
FIGURE2_LEFT = {
    "baseline": ["4xLSTM-512", "MoE-1-Wide", "MoE-1-Deep", "LSTM-2048-512"],
    "flat MoE": ["MoE-4", "MoE-32", "MoE-256"],
    "hierarchical MoE": ["MoE-256-h", "MoE-1024-h", "MoE-4096-h"],
}
# Figure 2-right (1B Word): x = ops/timestep. Top line: Jozefowicz et al.'s LSTMs; bottom line:
# the ~4B-parameter MoE models at 10 epochs.
FIGURE2_RIGHT = {
    "LSTM (Jozefowicz et al.)": [
        "LSTM-512-512*",
        "LSTM-1024-512*",
        "LSTM-2048-512*",
        "2xLSTM-8192-1024*",
    ],
    "MoE (~4B params)": ["MoE-4096-h", "MoE-34M", "MoE-143M"],
}
# Figure 3 (100B words): top line after 10B words, bottom line after 100B words (Table 8).
FIGURE3_LINES = {
    "10B words": "test_perplexity_10B_words",
    "100B words": "test_perplexity_100B_words",
}
FIGURE3_BASELINE = "4xLSTM-512"  # a point at 8.4M params; whether the paper draws it is (?)


def _table_name(table: str) -> str:
    name = table.strip().lower().replace(" ", "")
    name = f"table{name}" if name.isdigit() else name
    if name not in (*PAPER_TABLES, "peers"):
        raise ValueError(f"unknown table {table!r}; expected one of {[*PAPER_TABLES, 'peers']}")
    return name


def load(table: str) -> pd.DataFrame:
    """One packaged CSV: "table1" ... "table8" (also "Table 7" or "7"), or "peers".

    `value` is float; text columns are str with "" for empty cells. Table 6 adds float
    `w_importance`/`w_load`; peers has its own columns (README.md).
    """
    name = _table_name(table)
    with files("analysis.paper_data").joinpath(f"{name}.csv").open(encoding="utf-8") as f:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
    df["value"] = df["value"].astype(float)
    if name == "table6":
        df[["w_importance", "w_load"]] = df[["w_importance", "w_load"]].astype(float)
    if name == "peers":
        for col in _PEERS_INT:
            df[col] = pd.to_numeric(df[col].replace("", None)).astype("Int64")
        df["load"] = pd.to_numeric(df["load"].replace("", None)).astype(float)
        df["paired"] = df["paired"].map({"true": True, "false": False}).astype(bool)
    return df


def wide(df: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per (corpus, model, preset, setting), one column per metric (values), file order."""
    keys = ["corpus", "model", "preset", "setting"]
    df = df if metrics is None else df[df["metric"].isin(metrics)]
    out = df.pivot_table(index=keys, columns="metric", values="value", sort=False, aggfunc="first")
    return out.reset_index().rename_axis(columns=None)


def _rows(table: str, models: list[str], metrics: list[str]) -> pd.DataFrame:
    """Wide Table `table` rows for `models` (in that order), printed-table metrics only."""
    df = load(table)
    df = df[df["source"] == f"Table {table[-1]}"]
    w = wide(df[df["model"].isin(models)], metrics).set_index("model").loc[models]
    return w.reset_index()


def figure2_left_series() -> pd.DataFrame:
    """Figure 2-left points: Table 7's ~8M-ops models at 10 epochs, one row per model.

    Columns: series ("baseline", "flat MoE", "hierarchical MoE"), model, preset,
    params_excl_embedding_softmax_M (x), ops_per_timestep_M, test_perplexity_10_epochs (y).
    """
    metrics = ["params_excl_embedding_softmax_M", "ops_per_timestep_M", "test_perplexity_10_epochs"]
    parts = [
        _rows("table7", models, metrics).assign(series=series)
        for series, models in FIGURE2_LEFT.items()
    ]
    return pd.concat(parts, ignore_index=True)[["series", "model", "preset", *metrics]]


def figure2_right_series() -> pd.DataFrame:
    """Figure 2-right points: test perplexity against ops/timestep, from Table 7 (long format).

    Whether the paper's LSTM line uses the final or the 10-epoch perplexity is not stated, so
    the LSTM line comes twice (metric "test_perplexity_final": 4 points; "..._10_epochs": the 2
    models that have one); the MoE line exists only at 10 epochs.
    Columns: line, metric, model, preset, ops_per_timestep_M (x), params_excl_embedding_softmax_M,
    test_perplexity (y).
    """
    cols = ["ops_per_timestep_M", "params_excl_embedding_softmax_M"]
    parts = []
    for line, models in FIGURE2_RIGHT.items():
        w = _rows("table7", models, [*cols, "test_perplexity_final", "test_perplexity_10_epochs"])
        for metric in ("test_perplexity_final", "test_perplexity_10_epochs"):
            if metric not in w:
                continue
            part = w[w[metric].notna()].assign(line=line, metric=metric)
            parts.append(part.rename(columns={metric: "test_perplexity"}))
    out = pd.concat(parts, ignore_index=True)
    return out[["line", "metric", "model", "preset", *cols, "test_perplexity"]]


def figure3_series() -> pd.DataFrame:
    """Figure 3 points: Table 8's perplexity after 10B and 100B words against params (long).

    Kneser-Ney has no parameter count and is left out; 4xLSTM-512 is kept with
    is_baseline=True. Columns: line ("10B words", "100B words"), words_B, metric, model, preset,
    params_excl_embedding_softmax_M (x), ops_per_timestep_M, test_perplexity (y), is_baseline.
    """
    df = load("table8")
    # Table order, i.e. ascending params.
    models = [m for m in df["model"].unique() if not m.startswith("Kneser")]
    cols = ["params_excl_embedding_softmax_M", "ops_per_timestep_M"]
    w = _rows("table8", models, [*cols, *FIGURE3_LINES.values()])
    parts = []
    for line, metric in FIGURE3_LINES.items():
        part = w.assign(line=line, metric=metric, words_B=float(line.split("B")[0]))
        parts.append(part.rename(columns={metric: "test_perplexity"}))
    out = pd.concat(parts, ignore_index=True)
    out["is_baseline"] = out["model"] == FIGURE3_BASELINE
    return out[
        ["line", "words_B", "metric", "model", "preset", *cols, "test_perplexity", "is_baseline"]
    ]


def figure3_gap() -> pd.DataFrame:
    """Per model, perplexity after 10B minus after 100B words (the gap Figure 3 shows widening).

    Columns: model, preset, params_excl_embedding_softmax_M, ppl_10B_words, ppl_100B_words, gap.
    """
    s = figure3_series()
    w = s.pivot_table(
        index=["model", "preset", "params_excl_embedding_softmax_M"],
        columns="line",
        values="test_perplexity",
        sort=False,
    ).reset_index()
    w = w.rename(columns={"10B words": "ppl_10B_words", "100B words": "ppl_100B_words"})
    w["gap"] = (w["ppl_10B_words"] - w["ppl_100B_words"]).round(6)
    return w.rename_axis(columns=None)
