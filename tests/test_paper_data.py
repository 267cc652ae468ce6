"""The packaged paper numbers (analysis/paper_data) agree with themselves and with presets.py."""

from __future__ import annotations

import math
import re
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest

from analysis import paper
from moe_impl.model.presets import PAPER_EXCEPTIONS, PAPER_VALUES, TABLE1

# --- reading the packaged tables back (the CSVs keep each printed cell beside its value) ---------

_NUMBER = re.compile(r"^([+\-−]?\d+(?:\.\d+)?)\s*(.*)$")
_UNIT = {"_M": 1e6, "_B": 1e9}


def parse_printed(printed: str, metric: str) -> float:
    """The number in a printed cell, in the unit the metric name ends with (_M, _B or none).

    "151 million" or "85M" -> millions, "8.7B" -> billions; a metric ending in _M/_B rescales
    ("278M" as params_total_B is 0.278). "−19%" -> -19.0, "+3.06" -> 3.06, "59 hours" -> 59.0.
    """
    m = _NUMBER.match(printed.strip())
    if m is None:
        raise ValueError(
            f"printed value {printed!r} (metric {metric!r}) does not start with a number"
        )
    number = float(m.group(1).replace("−", "-"))
    rest = m.group(2)
    scale = 1e6 if rest == "M" or rest.startswith(("M ", "million")) else None
    scale = 1e9 if rest == "B" or rest.startswith("B ") else scale
    unit = _UNIT.get(metric[-2:])
    if scale is None:
        return number
    if unit is None:
        raise ValueError(f"printed value {printed!r} has a scale but metric {metric!r} has no unit")
    return round(number * scale / unit, 12)


def load_all() -> pd.DataFrame:
    """Tables 1-8 stacked, with the common COLUMNS only (Table 6's weights stay in `setting`)."""
    return pd.concat([paper.load(t)[paper.COLUMNS] for t in paper.PAPER_TABLES], ignore_index=True)


# The source lines the CSVs transcribe (the paper's table rows, our peer timing log), keyed by
# source and line id (see the file's header)
SOURCES = Path(__file__).resolve().parent / "assets" / "transcribed_sources.txt"

# PaperRow field -> our metric name (Tables 7 and 8).
FIELD_METRIC = {
    "ops_M": "ops_per_timestep_M",
    "params_M": "params_excl_embedding_softmax_M",
    "total_B": "params_total_B",
    "tflops_per_gpu": "tflops_per_gpu",
    "drop_prob": "drop_prob",
    "ppl_10_epochs": "test_perplexity_10_epochs",
    "ppl_final": "test_perplexity_final",
    "ppl_10B_words": "test_perplexity_10B_words",
    "ppl_100B_words": "test_perplexity_100B_words",
}
TABLE6_SETTINGS = {(0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0)}


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {name: paper.load(name) for name in (*paper.PAPER_TABLES, "peers")}


def _cell(df: pd.DataFrame, model: str, metric: str, source: str | None = None) -> pd.Series:
    hit = df[(df["model"] == model) & (df["metric"] == metric)]
    if source is not None:
        hit = hit[hit["source"] == source]
    assert len(hit) <= 1, (model, metric)
    return hit.iloc[0] if len(hit) else None


@pytest.mark.parametrize(
    ("printed", "metric", "value"),
    [
        ("151 million", "params_excl_embedding_softmax_M", 151.0),
        ("85M", "ops_per_timestep_M", 85.0),
        ("278M", "params_total_B", 0.278),
        ("8.7B", "params_total_B", 8.7),
        ("−19%", "x", -19.0),
        ("+3.06", "bleu_gain", 3.06),
        ("0.00001", "ops_per_timestep_M", 1e-5),
        ("32 K40s", "n", 32),
    ],
)
def test_parse_printed(printed, metric, value):
    assert parse_printed(printed, metric) == pytest.approx(value)


def test_parse_printed_rejects_non_numbers_and_unitless_scales():
    with pytest.raises(ValueError, match="various"):
        parse_printed("various", "train_time_days")
    with pytest.raises(ValueError, match="no unit"):
        parse_printed("85M", "bleu")


def test_every_value_parses_from_printed(tables):
    for name, df in tables.items():
        parsed = [parse_printed(p, m) for p, m in zip(df["printed"], df["metric"], strict=True)]
        assert df["value"].tolist() == pytest.approx(parsed, rel=1e-12), name
        assert not df["printed"].str.contains(r"\*\*|—").any(), name


def test_no_duplicate_keys(tables):
    # Table 6 (weights) and Table 5 (language pair) need `setting` to tell rows apart.
    everything = load_all()
    assert not everything.duplicated(["source", "model", "setting", "metric"]).any()
    peers = tables["peers"]
    key = ["source", "implementation", "num_experts", "tokens", "d_model", "k", "threads", "metric"]
    assert not peers.duplicated(key).any()


def test_load_names_and_columns(tables):
    pd.testing.assert_frame_equal(paper.load("Table 7"), tables["table7"])
    pd.testing.assert_frame_equal(paper.load("8"), tables["table8"])
    with pytest.raises(ValueError, match="unknown table"):
        paper.load("table9")
    for name in paper.PAPER_TABLES:
        assert set(paper.COLUMNS) <= set(tables[name].columns), name
        assert (tables[name]["source"] != "").all() and (tables[name]["corpus"] != "").all()
    shipped = {p.name for p in files("analysis.paper_data").iterdir() if p.name.endswith(".csv")}
    assert shipped == {f"{n}.csv" for n in (*paper.PAPER_TABLES, "peers")}
    readme = files("analysis.paper_data").joinpath("README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in shipped)


@pytest.mark.parametrize("preset", sorted(PAPER_VALUES))
def test_tables_7_and_8_equal_presets_paper_values(tables, preset):
    row = PAPER_VALUES[preset]
    df = tables["table" + row.source[-1]]
    mine = df[df["preset"] == preset]
    assert set(mine["model"]) == {row.row}
    for field, metric in FIELD_METRIC.items():
        cell = _cell(mine, row.row, metric, row.source)
        expected = getattr(row, field, None)
        assert (cell["printed"] if cell is not None else None) == expected, (field, preset)
    gpus = _cell(mine, row.row, "num_gpus")
    assert (int(gpus["value"]) if gpus is not None else None) == row.num_gpus


def test_every_neural_row_of_tables_7_and_8_has_a_preset(tables):
    for name in ("table7", "table8"):
        df = tables[name]
        neural = df[~df["model"].str.startswith("Kneser")]
        assert (neural["preset"] != "").all()
        assert set(neural["preset"]) <= set(PAPER_VALUES)
    presets = set(tables["table7"]["preset"]) | set(tables["table8"]["preset"])
    assert presets - {""} == set(PAPER_VALUES)


@pytest.mark.parametrize("label", sorted(TABLE1))
def test_table1_equals_presets_table1(tables, label):
    preset, params, ops = TABLE1[label]
    t1 = tables["table1"][tables["table1"]["model"] == label]
    assert set(t1["preset"]) == {preset}
    printed = t1.set_index("metric")["printed"]
    assert printed["params_excl_embedding_softmax_M"].removesuffix(" million") == params
    assert printed["ops_per_timestep_M"].removesuffix(" million") == ops


@pytest.mark.parametrize("label", sorted(TABLE1))
def test_table1_is_table7_under_other_names(tables, label):
    preset = TABLE1[label][0]
    t1 = tables["table1"][tables["table1"]["model"] == label].set_index("metric")["value"]
    t7 = tables["table7"][tables["table7"]["preset"] == preset].set_index("metric")["value"]
    assert t1["test_perplexity_10_epochs"] == t7["test_perplexity_10_epochs"]
    if "test_perplexity_100_epochs" in t1:  # only the Jozefowicz model has one
        assert t1["test_perplexity_100_epochs"] == t7["test_perplexity_final"]
    assert t1["ops_per_timestep_M"] == t7["ops_per_timestep_M"]
    assert t1["tflops_per_gpu"] == t7["tflops_per_gpu"]
    assert t1["num_gpus"] == t7["num_gpus"]
    # Table 1 prints params in whole millions: rounded, or truncated where PAPER_EXCEPTIONS says.
    kind = PAPER_EXCEPTIONS.get(("Table 1", preset, "params_M"), ("rounded",))[0]
    to_int = math.floor if kind == "truncated" else round
    assert t1["params_excl_embedding_softmax_M"] == to_int(t7["params_excl_embedding_softmax_M"])


def test_table6_has_the_six_balancing_settings(tables):
    t6 = tables["table6"]
    settings = set(zip(t6["w_importance"], t6["w_load"], strict=True))
    assert settings == TABLE6_SETTINGS
    assert t6.groupby("setting")["metric"].apply(frozenset).nunique() == 1
    assert len(t6) == 6 * 4
    w = paper.wide(t6).set_index("setting")
    # Without the losses the routing collapses: worst perplexity and CVs, largest overload.
    unbalanced = w.loc["w_importance=0.0;w_load=0.0"]
    others = w.drop(index="w_importance=0.0;w_load=0.0")
    for metric in ("test_perplexity_10_epochs", "cv_importance", "cv_load", "max_over_mean_load"):
        assert (unbalanced[metric] > others[metric]).all(), metric
    # The App. C.1 default (0.1/0.1) gives 35.6 here and 35.7 in Table 7 (as printed).
    t7 = _cell(tables["table7"], "MoE-256", "test_perplexity_10_epochs")["value"]
    assert round(t7 - w.loc["w_importance=0.1;w_load=0.1", "test_perplexity_10_epochs"], 6) == 0.1


def test_units_are_sane():
    df = load_all()
    by = dict(tuple(df.groupby("metric")["value"]))
    for metric, values in by.items():
        if "perplexity" in metric and not metric.endswith("percent"):
            assert (values > 1).all(), metric
        if metric.endswith("bleu") or metric == "bleu":
            assert values.between(0, 100).all(), metric
    assert by["tflops_per_gpu"].between(0, 4.29).all()  # K40 peak, as the paper quotes it
    assert by["drop_prob"].between(0, 1, inclusive="left").all()
    assert (by["num_gpus"] > 0).all() and (by["num_gpus"] == by["num_gpus"].round()).all()
    assert (by["ops_per_timestep_M"] > 0).all() and (by["params_total_B"] > 0).all()
    assert (by["cv_importance"] >= 0).all() and (by["max_over_mean_load"] >= 1).all()
    # params excl. embedding/softmax never exceed the total (M vs B).
    w = paper.wide(df[df["corpus"].isin(["lm1b", "news100b"])])
    both = w.dropna(subset=["params_excl_embedding_softmax_M", "params_total_B"])
    assert (both["params_excl_embedding_softmax_M"] / 1e3 <= both["params_total_B"] + 0.05).all()


def test_table5_gains_are_moe_multi_minus_gnmt_multi(tables):
    t5 = tables["table5"]
    bleu = t5[t5["metric"] == "bleu"].pivot(index="setting", columns="model", values="value")
    gain = t5[t5["metric"] == "bleu_gain"].set_index("setting")["value"]
    assert len(gain) == 12 and set(gain.index) == set(bleu.index)
    diff = (bleu["MoE-Multi"] - bleu["GNMT-Multi"]).round(2)
    pd.testing.assert_series_equal(diff.loc[gain.index], gain, check_names=False)
    ppl = t5[t5["metric"] == "dev_perplexity"].set_index("model")["value"]
    change = _cell(t5, "MoE-Multi vs GNMT-Multi", "dev_perplexity_change_percent")["value"]
    assert round(100 * (ppl["MoE-Multi"] / ppl["GNMT-Multi"] - 1)) == change


def _table_value(df: pd.DataFrame, model: str, metric: str) -> float:
    return _cell(df, model, metric)["value"]


def test_figure2_left_points_are_table7_rows(tables):
    s = paper.figure2_left_series()
    assert len(s) == sum(len(m) for m in paper.FIGURE2_LEFT.values())
    assert list(s["series"].unique()) == list(paper.FIGURE2_LEFT)
    for r in s.itertuples():
        for metric in (
            "params_excl_embedding_softmax_M",
            "ops_per_timestep_M",
            "test_perplexity_10_epochs",
        ):
            assert getattr(r, metric) == _table_value(tables["table7"], r.model, metric)
    # ~8M ops/timestep: all within the 8.4-9.4M of Table 7's matched models
    assert s["ops_per_timestep_M"].between(8.4, 9.4).all()


def test_figure2_right_points_are_table7_rows(tables):
    s = paper.figure2_right_series()
    assert s.groupby(["line", "metric"]).size().to_dict() == {
        ("LSTM (Jozefowicz et al.)", "test_perplexity_final"): 4,
        ("LSTM (Jozefowicz et al.)", "test_perplexity_10_epochs"): 2,
        ("MoE (~4B params)", "test_perplexity_10_epochs"): 3,
    }
    for r in s.itertuples():
        assert r.test_perplexity == _table_value(tables["table7"], r.model, r.metric)
        assert r.ops_per_timestep_M == _table_value(tables["table7"], r.model, "ops_per_timestep_M")
    moe = s[s["line"] == "MoE (~4B params)"]
    assert moe["params_excl_embedding_softmax_M"].between(4000, 4400).all()


def test_figure3_points_equal_table8_columns(tables):
    s = paper.figure3_series()
    t8 = tables["table8"]
    neural = t8[~t8["model"].str.startswith("Kneser")]["model"].unique()
    assert len(s) == 2 * len(neural)
    for line, metric in paper.FIGURE3_LINES.items():
        part = s[s["line"] == line]
        assert list(part["model"]) == list(neural) and (part["metric"] == metric).all()
        for r in part.itertuples():
            assert r.test_perplexity == _table_value(t8, r.model, metric)
            assert r.params_excl_embedding_softmax_M == _table_value(
                t8, r.model, "params_excl_embedding_softmax_M"
            )
    assert s["is_baseline"].sum() == 2
    gap = paper.figure3_gap().set_index("model")["gap"]
    assert gap.iloc[-1] > gap.iloc[0]  # the gap widens overall (not monotonically: see README)


def test_peers_us_per_token_is_median_ms_over_tokens(tables):
    p = tables["peers"]
    p = p[p["tokens"].notna()]
    w = p.pivot_table(index="source_line", columns="metric", values="value")
    tokens = p.groupby("source_line")["tokens"].first().astype(float)
    expected = w["step_ms_median"] * 1e3 / tokens
    assert ((w["us_per_token_median"] - expected).abs() <= 0.15).all()


def _source_lines(name: str) -> dict[int, str]:
    """{line id: text} of one source's lines in tests/assets/transcribed_sources.txt."""
    out = {}
    for line in SOURCES.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            file, number, text = line.split(":", 2)
            if file == name:
                out[int(number)] = text
    return out


def test_peers_rows_point_at_their_source_line(tables):
    lines = _source_lines("peers")
    assert set(lines) == set(tables["peers"]["source_line"])
    for r in tables["peers"].itertuples():
        cells = [c.strip() for c in lines[r.source_line].strip("|").split("|")]
        assert cells[0] == r.implementation
        assert any(r.printed in c for c in cells), (r.source_line, r.printed)


def test_paper_rows_appear_in_the_transcribed_tables():
    text = "\n".join(_source_lines("paper").values()).replace("**", "")
    for r in load_all().itertuples():
        assert r.printed in text, (r.source, r.model, r.metric, r.printed)
