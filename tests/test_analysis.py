"""analysis/: collect (run dirs and MLflow give the same frames), every figure's panels and series,
the tables, REPORT.md's verdicts following their rules, and the CLI writing its files.

Runs are built three ways: in memory per rundir.py's contract (synthetic frames, fast), written to
disk the same way, and one real tiny training run (a few seconds) for the true file layout.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import uuid

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import cli, collect, figures, io, report, rules, tables
from moe_impl import cli as moe_cli
from moe_impl import tracking
from moe_impl.model import flops
from moe_impl.runs import rundir, runinfo
from moe_impl.train.config import load_config, model_config

VOCAB = 577
UNIGRAM, FLOOR = 400.0, 20.0  # the corpus's unigram and Bayes-optimal (floor) perplexities


def make_run(
    sweep: str,
    preset: str,
    ppl: float,
    *,
    early: float | None = None,
    w: tuple[float, float] = (0.1, 0.1),
    cv: tuple[float, float, float] = (0.1, 0.1, 1.3),
    load: list[int] | None = None,
    seed: int = 0,
    unigram: float | None = UNIGRAM,
    floor: float = FLOOR,
) -> dict:
    """A finished run as io.read_run returns it (config resolved by the real config loader).
    unigram, floor: the corpus's unigram and Bayes-optimal perplexities (unigram None: unknown,
    as in summaries written before it was recorded)."""
    cfg = load_config(
        overrides=[
            f"model.preset={preset}",
            f"sweep={sweep}",
            f"model.w_importance={w[0]}",
            f"model.w_load={w[1]}",
            f"train.seed={seed}",
            "tracking.enabled=false",
        ]
    )
    model = model_config(cfg, VOCAB)
    summary = dict.fromkeys(rundir.SUMMARY_KEYS)
    summary.update(
        name=model.name,
        preset=preset,
        model=dataclasses.asdict(model),  # the resolved model, as training writes it
        corpus={"corpus": "synthetic", "vocab_size": VOCAB}
        | ({} if unigram is None else {"unigram_perplexity": unigram}),
        test_perplexity=ppl,
        floor_nll=math.log(floor),
        test_nll=math.log(ppl),
        eval_split="test",
        params_excl_embedding_softmax=flops.params_excl_embedding_softmax(model),
        ops_per_timestep=flops.ops_per_timestep(model),
        tflops_per_device=0.002,
        mfu=0.1,
        cv_importance=cv[0],
        cv_load=cv[1],
        max_over_mean_load=cv[2],
        train_tokens=20480,
        steps=40,
        device="cpu",
        device_name="test cpu",
        snapshots=[]
        if early is None
        else [
            {
                "step": 4,
                "tokens": 2048,
                "split": "test",
                "nll": math.log(early),
                "perplexity": early,
                "excess_nll": None,
            }
        ],
    )
    expert_load = None if load is None else {"steps": 20, "tokens_per_expert": load}
    return {
        "run_dir": f"mem/{sweep}/{model.name}-{w[0]}-{w[1]}-{seed}",
        "config": cfg.to_dict(),  # as config.yaml reads back
        "summary": summary,
        "identity": {"run_id": uuid.uuid4().hex},
        "expert_load": expert_load,
    }


def write_run(root, run: dict):
    """The run directory rundir.py describes, for `run` (as make_run builds it)."""
    path = root / run["run_dir"].removeprefix("mem/")
    path.mkdir(parents=True)
    (path / rundir.CONFIG_FILE).write_text(yaml.safe_dump(run["config"], sort_keys=False))
    runinfo.write_run_identity(path, run["summary"]["name"], "moe")
    identity = rundir.read_json(path / rundir.RUN_FILE)
    run["identity"] = identity
    rundir.write_json(path / rundir.SUMMARY_FILE, run["summary"])
    if run["expert_load"] is not None:
        rundir.write_json(path / rundir.EXPERT_LOAD_FILE, run["expert_load"])
    return path


def good_runs() -> list[dict]:
    """Every sweep, with numbers under which each claim holds."""
    rng = np.random.default_rng(0)
    skewed = (rng.pareto(1.5, 256) * 100 + 1).astype(int).tolist()
    even = (rng.normal(100, 5, 256)).astype(int).tolist()
    return [
        make_run("lm1b", "cpu/4xLSTM-64", 131.0),
        make_run("lm1b", "cpu/MoE-1-Wide", 130.0),
        make_run("lm1b", "cpu/MoE-4", 128.0),
        make_run("lm1b", "cpu/MoE-32", 120.0),
        make_run("lm1b", "cpu/MoE-256", 112.0),
        make_run("lm1b", "cpu/MoE-256-h", 113.0),
        make_run("lm1b", "cpu/MoE-1024-h", 108.0),
        # N snapshots past the unigram stage: ln(85 / FLOOR) <= ln(UNIGRAM / FLOOR) / 2
        make_run("news100b", "cpu/4xLSTM-64", 60.0, early=85.0),
        make_run("news100b", "cpu/MoE-32", 56.0, early=81.0),
        make_run("news100b", "cpu/MoE-256-h", 52.0, early=78.0),
        make_run("news100b", "cpu/MoE-16384-h", 47.0, early=76.0),
        make_run("news100b", "cpu/MoE-65536-h", 45.0, early=75.0),
        make_run("news100b", "cpu/MoE-131072-h", 46.0, early=77.0),
        make_run("balance", "cpu/MoE-256", 125.0, w=(0, 0), cv=(2.0, 1.8, 9.0), load=skewed),
        make_run("balance", "cpu/MoE-256", 112.0, w=(0.1, 0.1), cv=(0.1, 0.08, 1.2), load=even),
        make_run("balance", "cpu/MoE-256", 113.0, w=(0, 0.1), cv=(0.3, 0.1, 1.5)),
    ]


@pytest.fixture(scope="module")
def good() -> collect.Collected:
    return collect.frames(good_runs())


def bench_frame() -> pd.DataFrame:
    """Two tokens modes; the fixed-tokens flat rows share the peers' configuration (peers.csv)."""
    rows = []
    for mode, tokens in (("fixed_tokens", 4096), ("fixed_tokens_per_expert", None)):
        for kind, n in (("flat", 4), ("flat", 32), ("hierarchical", 256)):
            t = tokens or n * 16
            rows.append(
                {
                    "kind": kind,
                    "num_experts": n,
                    "tokens": t,
                    "tokens_mode": mode,
                    "target_tokens_per_expert": None if tokens else 64.0,
                    "d_model": 64,
                    "d_hidden": 128,
                    "k": 4,
                    "threads": 1,
                    "device": "cpu",
                    "status": "ok",
                    "moe_us_per_token": 10.0 + n / 10,
                    "dense_us_per_token": 5.0,
                    "ratio_median": 2.0 + n / 100,
                    "moe_gflops": 30.0,
                    "mfu": 0.2,
                }
            )
    rows.append({**rows[-1], "num_experts": 131072, "status": "skipped"})
    return pd.DataFrame(rows)


# --- collect ------------------------------------------------------------------------------------


def test_collect_gives_the_tidy_contract(tmp_path):
    runs = good_runs()
    for run in runs:
        write_run(tmp_path / "runs", run)
    (tmp_path / "runs" / "unfinished").mkdir()
    runinfo.write_run_identity(tmp_path / "runs" / "unfinished", "x", "moe")
    data, unfinished = collect.collect_runs(tmp_path / "runs")
    assert [(s.run_dir.name, s.why) for s in unfinished] == [
        ("unfinished", "unfinished, no summary.json")
    ]
    s = data.summary
    assert len(s) == len(runs) and s["run_id"].is_unique
    assert list(s.columns[: len(collect.IDENTITY_COLUMNS)]) == collect.IDENTITY_COLUMNS
    assert set(rundir.SUMMARY_KEYS) <= set(s.columns) and "corpus.vocab_size" in s
    assert not any(c.startswith("model.") for c in s.columns)  # the structure columns have it
    h = s[(s["model"] == "MoE-131072-h")].iloc[0]
    assert (h["family"], h["num_groups"], h["group_size"], h["k"]) == (
        "hierarchical MoE",
        256,
        512,
        4,
    )
    assert s.loc[s["model"] == "4xLSTM-64", "paper_model"].iloc[0] == "4xLSTM-512"
    snaps = data.snapshots
    assert len(snaps) == len(runs) + 6  # a final evaluation each, 6 news100b snapshots
    assert set(snaps["kind"]) == {"snapshot", "final"}
    assert len(data.loads) == 2 * 256


def test_collect_reads_the_model_from_the_summary():
    run = make_run("lm1b", "cpu/MoE-32", 120.0)
    h = {**run["summary"]["model"], "name": "MoE-8x8-h", "moe": "hierarchical", "num_experts": 64,
         "num_groups": 8, "group_size": 8, "k": None, "k_primary": 2, "k_secondary": 1}  # fmt: skip
    run["summary"]["model"] = h  # differs from the config's preset: the summary wins
    row = collect.run_record(run)
    assert (row["model"], row["family"], row["moe"], row["num_experts"]) == (
        "MoE-8x8-h",
        "hierarchical MoE",
        "hierarchical",
        64,
    )
    assert (row["num_groups"], row["group_size"], row["k"]) == (8, 8, 2)
    assert row["d_model"] == h["d_model"] and row["d_hidden"] == h["d_hidden"]


@pytest.mark.parametrize(
    "preset", ["cpu/4xLSTM-64", "cpu/MoE-1-Wide", "cpu/MoE-32", "cpu/MoE-1024-h"]
)
def test_a_summary_without_model_resolves_the_config_the_same(preset):
    run = make_run("lm1b", preset, 120.0)
    legacy = {**run, "summary": {k: v for k, v in run["summary"].items() if k != "model"}}
    cols = collect.IDENTITY_COLUMNS
    assert {k: collect.run_record(legacy)[k] for k in cols} == {
        k: collect.run_record(run)[k] for k in cols
    }


def test_paper_rows_take_their_structure_from_the_preset():
    presets = ["lm1b/MoE-256-h", "lm1b/4xLSTM-512", "lm1b/MoE-1-Deep", "news100b/MoE-32"]
    assert collect.paper_structure(presets) == {
        "moe": ["hierarchical", "none", "dense", "flat"],
        "num_experts": [256, 0, 1, 32],
        "family": ["hierarchical MoE", "baseline", "baseline", "flat MoE"],
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real training run (~3 s): an 8-expert flat MoE with a snapshot at 256 tokens."""
    out = tmp_path_factory.mktemp("runs") / "news100b" / "tiny"
    rc = moe_cli.main(
        [
            "train",
            "--out",
            str(out),
            "--set",
            "model.preset=cpu/MoE-4",
            *[
                f"--set={s}"
                for s in (
                    "sweep=news100b",
                    "model.num_experts=8",
                    "model.d_model=16",
                    "model.lstm_layers=[[16, null], [16, null]]",
                    "model.d_hidden=16",
                    "data.synthetic.vocab_size=48",
                    "data.synthetic.num_topics=4",
                    "data.synthetic.max_len=40",
                    "train.batch_size=4",
                    "train.seq_len=16",
                    "train.tokens=512",
                    "train.warmup_steps=2",
                    "train.progress=none",
                    "train.threads=1",
                    "eval.tokens=128",
                    "eval.batch_size=4",
                    "eval.seq_len=16",
                    "eval.at_tokens=[128]",
                    "tracking.enabled=false",
                    "telemetry.peak_flops=1e11",
                )
            ],
        ]
    )
    assert rc == 0
    return out


@pytest.mark.integration
def test_collect_reads_a_real_run_directory(tiny_run):
    data, _ = collect.collect_runs(tiny_run.parent)
    row = data.summary.iloc[0]
    summary = rundir.read_summary(tiny_run)
    assert (row["sweep"], row["model"], row["num_experts"], row["moe"]) == (
        "news100b",
        "MoE-8",
        8,
        "flat",
    )
    assert row["test_perplexity"] == summary["test_perplexity"]
    snaps = data.snapshots.sort_values("tokens")
    assert list(snaps["kind"]) == ["snapshot", "final"] and snaps["tokens"].iloc[0] == 128
    assert len(data.loads) == 8 and data.loads["tokens"].sum() > 0
    el = collect.early_late(data.summary, data.snapshots, "news100b")
    assert el["gap"].iloc[0] == pytest.approx(snaps["perplexity"].iloc[0] - row["test_perplexity"])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating one costs seconds)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.mark.integration
def test_collect_from_mlflow_equals_collect_from_run_dirs(tmp_path, tiny_run, store):
    root = tmp_path / "runs"
    for run in good_runs()[:3]:
        write_run(root, run)
    shutil.copytree(
        tiny_run, root / "news100b" / "tiny", ignore=shutil.ignore_patterns("checkpoints")
    )
    tracking.import_runs(
        sorted(p for p in root.glob("*/*")), experiment="imported", tracking_uri=store
    )
    direct, _ = collect.collect_runs(root)
    exports = tracking.export_runs("imported", tmp_path / "scratch", tracking_uri=store)
    via = collect.frames(collect.run_from_mlflow(e) for e in exports)  # = collect_mlflow
    pd.testing.assert_frame_equal(
        direct.summary.drop(columns="run_dir"), via.summary.drop(columns="run_dir")
    )
    pd.testing.assert_frame_equal(direct.snapshots, via.snapshots)
    # without the artifacts, params + metrics give the same numbers
    bare = collect.frames(collect.run_from_mlflow({**e, "dir": None}) for e in exports)
    cols = ["run_id", "sweep", "model", "num_experts", "test_perplexity", "w_load"]
    pd.testing.assert_frame_equal(direct.summary[cols], bare.summary[cols], check_dtype=False)
    pd.testing.assert_frame_equal(
        direct.snapshots[["run_id", "kind", "tokens", "perplexity"]],
        bare.snapshots[["run_id", "kind", "tokens", "perplexity"]],
        check_dtype=False,
    )


# --- figures ------------------------------------------------------------------------------------


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_figure2_left_and_right_panels(good):
    fig = figures.figure2_left(good.summary)
    paper_ax, ours_ax = fig.axes
    assert _titles(fig)[0].startswith("paper:") and _titles(fig)[1].startswith("this run:")
    assert _labels(paper_ax) == [
        "4xLSTM-512",
        "MoE-1-Wide",
        "MoE-1-Deep",
        "LSTM-2048-512",
        "flat MoE (k=4)",
        "hierarchical MoE (k=2+2)",
    ]
    assert _labels(ours_ax) == [
        "4xLSTM-64",
        "MoE-1-Wide",
        "flat MoE (k=4)",
        "hierarchical MoE (k=2+2)",
    ]
    flat = ours_ax.get_lines()[2]
    assert list(flat.get_ydata()) == [128.0, 120.0, 112.0]
    assert paper_ax.get_xscale() == ours_ax.get_xscale() == "log"
    assert "parameters" in paper_ax.get_xlabel() and "millions" in paper_ax.get_xlabel()
    fig = figures.figure2_right(good.summary)
    assert len(_labels(fig.axes[0])) == 3 and fig.axes[0].get_xscale() == "log"
    assert _labels(fig.axes[1]) == [f"{f} runs" for f in collect.FAMILIES]


def test_budget_models_are_compared_at_their_token_count():
    """Fig. 2-right's budget models train fewer tokens than the rest of the lm1b sweep: every run
    is taken at that count, from its snapshot there (a run without one is left out)."""
    short = make_run("lm1b", "cpu/LSTM-2048-128", 90.0)
    short["summary"].update(train_tokens=2048, steps=4)
    runs = [
        short,
        make_run("lm1b", "cpu/MoE-4096-h", 60.0, early=95.0),  # its snapshot at 2048 tokens
        make_run("lm1b", "cpu/MoE-32", 70.0),  # no snapshot there
        make_run("news100b", "cpu/MoE-32", 50.0, early=80.0),  # another sweep
    ]
    c = collect.frames(runs)
    at, tokens = collect.at_common_tokens(c.summary, c.snapshots, "lm1b")
    assert tokens == 2048
    assert dict(zip(at["model"], at["test_perplexity"], strict=True)) == {
        "LSTM-2048-128": 90.0,
        "MoE-4096-h": 95.0,
    }
    fig = figures.figure2_right(c.summary, c.snapshots)
    assert fig.axes[1].get_ylabel() == "test perplexity after 2,048 tokens"
    # Fig. 2-left is at the sweep's full token count: the budget model is not on it
    ours = figures.figure2_left(c.summary).axes[1]
    assert "LSTM-2048-128" not in _labels(ours)
    full = c.summary.loc[c.summary["sweep"] == "lm1b", "train_tokens"].max()
    assert full > 2048 and ours.get_ylabel() == f"test perplexity after {full:,} tokens"
    # Table 7 says how many tokens each model trained
    t7 = tables.table7(c.summary).set_index("this run's model")
    assert t7.loc["LSTM-2048-128", "training tokens (this run)"] == 2048


def test_figure3_panels_and_gap(good):
    fig = figures.figure3(good.summary, good.snapshots)
    assert len(fig.axes) == 4
    assert [t.split(":")[0] for t in _titles(fig)] == ["paper", "this run", "", ""]
    top = fig.axes[0].get_lines()
    assert len(top[0].get_xdata()) == 8 and len(top[1].get_xdata()) == 8  # Table 8's models
    ours_gap = fig.axes[3].get_lines()[0].get_ydata()
    assert list(ours_gap) == [25.0, 25.0, 26.0, 29.0, 30.0, 31.0]
    assert "seeds" not in _titles(fig)[1]  # one run per model: no bars
    assert any("N" in lab for lab in _labels(fig.axes[1]))


def test_table6_balance_panels(good):
    fig = figures.table6_balance(good.summary, good.loads)
    assert len(fig.axes) == 6
    assert _labels(fig.axes[0]) == ["CV(Importance)", "CV(Load)", "max(Load)/mean(Load)"]
    assert len(fig.axes[0].patches) == 3 * 6 and len(fig.axes[1].patches) == 3 * 3
    hist_labels = _labels(fig.axes[2])
    assert hist_labels[0].startswith("w = 0 / 0") and hist_labels[1].startswith("w = 0.1 / 0.1")


def test_perf_scaling_panels_and_peer_points():
    fig = figures.perf_scaling(bench_frame())
    assert len(fig.axes) == 4
    assert "fixed tokens per step" in fig.axes[0].get_title()
    assert "1 configuration(s) skipped" in fig.axes[1].get_title()
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    published = {"ref (peers.csv, published)", "davidmrau (peers.csv, published)"}
    assert {"flat MoE", "hierarchical MoE", *published} <= labels
    ref = next(
        ln for ln in fig.axes[0].get_lines() if ln.get_label() == "ref (peers.csv, published)"
    )
    assert list(ref.get_ydata()) == [14.1, 12.4]  # peers.csv's n=4 and n=32 rows (T=4096)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"


def test_perf_scaling_draws_the_peers_measured_in_the_run_apart_from_ours():
    ours = bench_frame()
    fixed = ours[ours["tokens_mode"] == "fixed_tokens"]
    peer = fixed.assign(implementation="st-moe-pytorch", moe_us_per_token=99.0, ratio_median=9.0)
    both = pd.concat([ours.assign(implementation="moe_impl"), peer], ignore_index=True)
    split_ours, split_peers = collect.split_bench(both)
    assert len(split_ours) == len(ours) and set(split_peers["implementation"]) == {"st-moe-pytorch"}
    fig = figures.perf_scaling(both)
    lines = {ln.get_label(): ln for ln in fig.axes[2].get_lines()}  # ratio panel, fixed tokens
    ok_flat = peer[(peer["kind"] == "flat") & (peer["status"] == "ok")]
    run_line = lines["st-moe-pytorch (this run)"]
    assert list(run_line.get_ydata()) == [9.0] * len(ok_flat)
    flat_ours = lines["flat MoE"]  # ours alone: the peer's rows do not join our line
    assert 9.0 not in list(flat_ours.get_ydata())
    eff = figures.efficiency(pd.DataFrame(), both)  # the efficiency figure counts our rows only
    assert eff is not None


def test_match_peers_requires_the_same_configuration():
    bench = bench_frame()
    m = collect.match_peers(bench)
    assert set(m["implementation"]) == {"ref", "davidmrau", "ref_hier"}
    assert collect.match_peers(bench.assign(threads=2)).empty
    assert collect.match_peers(bench.assign(device="cuda")).empty


def test_efficiency_panels(good):
    fig = figures.efficiency(good.summary, bench_frame())
    assert _titles(fig)[0].startswith("paper:") and _titles(fig)[1].startswith("this run:")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert "paper Table 8: hierarchical MoE" in labels and "this run lm1b: flat MoE" in labels
    assert fig.axes[2].get_ylabel().startswith("MFU")


def test_figures_say_not_run_for_missing_sweeps(good):
    only_lm1b = good.summary[good.summary["sweep"] == "lm1b"]
    for fig in (
        figures.figure3(only_lm1b, good.snapshots),
        figures.table6_balance(only_lm1b, good.loads.iloc[0:0]),
        figures.perf_scaling(pd.DataFrame()),
    ):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("not run") for t in texts)


# --- tables and report --------------------------------------------------------------------------


def test_tables_put_paper_values_beside_ours(good):
    t7 = tables.table7(good.summary)
    row = t7[t7["paper model"] == "MoE-32"].iloc[0]
    assert row["test ppl (this run)"] == 120.0 and row["test ppl, 10 epochs (paper)"] == 39.7
    assert t7.loc[t7["paper model"] == "MoE-4096-h", "runs"].isna().all()  # paper only
    t8 = tables.table8(good.summary, good.snapshots)
    row = t8[t8["paper model"] == "MoE-131072-h"].iloc[0]
    assert (row["gap (this run)"], row["gap (paper)"]) == (31.0, pytest.approx(10.6))
    md = tables.to_markdown(tables.table6(good.summary))
    assert md.count("\n") == 2 + 7 and "| 0 | 0 | 1 | 125 | 39.8 |" in md
    tex = tables.to_latex(t7, "Table 7")
    assert "\\toprule" in tex and "emb. \\& softmax" in tex and "MoE-4096-h &" in tex


def test_report_verdicts_follow_the_numbers(good):
    v = {x.key: x for x in report.verdicts(good.summary, good.snapshots)}
    assert {k: x.status for k, x in v.items()} == dict.fromkeys(v, rules.REPRODUCED)
    assert all(x.paper_status == rules.PAPER_HOLDS for x in v.values())
    assert "4: 128, 32: 120, 256: 112, 1,024: 108" in v["more_experts"].reason
    text = report.render(list(v.values()), good.summary)
    assert text.count("**reproduced**") == 2 * 5 and "16 finished runs" in text
    assert "one seed per model: no seed spread measured" in v["more_experts"].reason
    assert "unigram perplexity 400" in v["gap"].reason and "## Regime" in text


def _status(key: str, runs: list[dict]) -> str:
    c = collect.frames(runs)
    return {v.key: v for v in report.verdicts(c.summary, c.snapshots)}[key].status


@pytest.mark.parametrize(
    ("key", "runs", "expected"),
    [
        (
            "more_experts",
            [make_run("lm1b", "cpu/MoE-4", 110.0), make_run("lm1b", "cpu/MoE-32", 120.0)],
            rules.NOT_REPRODUCED,
        ),
        (
            "more_experts",
            [
                make_run("lm1b", "cpu/MoE-4", 120.0),
                make_run("lm1b", "cpu/MoE-32", 121.0),
                make_run("lm1b", "cpu/MoE-256", 110.0),
            ],
            rules.REPRODUCED,
        ),  # +0.8%: within 1%
        (
            "more_experts",
            [
                make_run("lm1b", "cpu/MoE-4", 120.0),
                make_run("lm1b", "cpu/MoE-32", 125.0),
                make_run("lm1b", "cpu/MoE-256", 110.0),
            ],
            rules.NOT_REPRODUCED,
        ),
        ("more_experts", [make_run("lm1b", "cpu/MoE-4", 120.0)], rules.NOT_RUN),
        (
            "hier_flat",
            [make_run("lm1b", "cpu/MoE-256", 100.0), make_run("lm1b", "cpu/MoE-256-h", 104.0)],
            rules.NOT_REPRODUCED,
        ),
        ("hier_flat", [make_run("lm1b", "cpu/MoE-256", 100.0)], rules.NOT_RUN),
        (
            "hier_flat",  # MoE-2.2M (256 experts, hierarchical, 14x the ops) is not MoE-256's pair
            [
                make_run("lm1b", "cpu/MoE-256", 100.0),
                make_run("lm1b", "cpu/MoE-256-h", 101.0),
                make_run("lm1b", "cpu/MoE-2.2M", 80.0),
            ],
            rules.REPRODUCED,
        ),
        (
            "hier_flat",  # a budget model alone is no counterpart either
            [make_run("lm1b", "cpu/MoE-256", 100.0), make_run("lm1b", "cpu/MoE-2.2M", 101.0)],
            rules.NOT_RUN,
        ),
        (
            "gap",
            [
                make_run("news100b", "cpu/MoE-32", 50.0, early=80.0),
                make_run("news100b", "cpu/MoE-256-h", 50.0, early=75.0),
                make_run("news100b", "cpu/MoE-1024-h", 50.0, early=70.0),
            ],
            rules.NOT_REPRODUCED,
        ),
        (
            "gap",  # widens, but N is still at the unigram stage (200 vs unigram 400)
            [
                make_run("news100b", "cpu/MoE-32", 100.0, early=180.0),
                make_run("news100b", "cpu/MoE-256-h", 100.0, early=190.0),
                make_run("news100b", "cpu/MoE-1024-h", 100.0, early=200.0),
            ],
            rules.NOT_TESTABLE,
        ),
        (
            "gap",  # the corpus's unigram perplexity unknown
            [
                make_run("news100b", f"cpu/{m}", 50.0, early=e, unigram=None)
                for m, e in (("MoE-32", 70.0), ("MoE-256-h", 75.0), ("MoE-1024-h", 80.0))
            ],
            rules.NOT_TESTABLE,
        ),
        ("gap", [make_run("news100b", "cpu/MoE-32", 100.0, early=200.0)], rules.NOT_RUN),
        (
            "degrade",  # more experts help up to 16384, but 131072 is within 1% of 65536
            [
                make_run("news100b", "cpu/MoE-32", 60.0),
                make_run("news100b", "cpu/MoE-16384-h", 50.0),
                make_run("news100b", "cpu/MoE-65536-h", 48.0),
                make_run("news100b", "cpu/MoE-131072-h", 48.2),
            ],
            rules.NOT_REPRODUCED,
        ),
        (
            "degrade",  # worse at 131072, but more experts never helped
            [
                make_run("news100b", "cpu/MoE-32", 50.0),
                make_run("news100b", "cpu/MoE-16384-h", 55.0),
                make_run("news100b", "cpu/MoE-65536-h", 56.0),
                make_run("news100b", "cpu/MoE-131072-h", 58.0),
            ],
            rules.NOT_TESTABLE,
        ),
        (
            "degrade",  # no 16384-expert model to see more experts help
            [
                make_run("news100b", "cpu/MoE-65536-h", 120.0),
                make_run("news100b", "cpu/MoE-131072-h", 125.0),
            ],
            rules.NOT_RUN,
        ),
        (
            "degrade",  # the sweep stops at 4096 experts: the scale cannot show it
            [make_run("news100b", "cpu/MoE-4096-h", 120.0)],
            rules.NOT_TESTABLE,
        ),
        ("degrade", [make_run("lm1b", "cpu/MoE-4096-h", 120.0)], rules.NOT_RUN),
        (
            "hier_flat",  # -4.8%, but two seeds each 10% apart cannot resolve 3%
            [make_run("lm1b", "cpu/MoE-256", p, seed=i) for i, p in enumerate((100.0, 110.0))]
            + [make_run("lm1b", "cpu/MoE-256-h", p, seed=i) for i, p in enumerate((104.0, 96.0))],
            rules.NOT_TESTABLE,
        ),
        (
            "hier_flat",  # +0.9% with seeds 0.4% apart
            [make_run("lm1b", "cpu/MoE-256", p, seed=i) for i, p in enumerate((100.0, 100.4))]
            + [make_run("lm1b", "cpu/MoE-256-h", p, seed=i) for i, p in enumerate((101.0, 101.4))],
            rules.REPRODUCED,
        ),
        (
            "balance",
            [
                make_run("balance", "cpu/MoE-256", 100.0, w=(0, 0), cv=(0.5, 0.3, 3.5)),
                make_run("balance", "cpu/MoE-256", 100.0, cv=(0.38, 0.1, 2.2)),
            ],
            rules.NOT_REPRODUCED,
        ),  # CV(Importance) only x0.76
        (
            "balance",
            [make_run("balance", "cpu/MoE-256", 100.0, cv=(0.38, 0.1, 2.2))],
            rules.NOT_RUN,
        ),
    ],
)
def test_a_failing_or_missing_claim_says_so(key, runs, expected):
    assert _status(key, runs) == expected


def _seeded(sweep: str, runs: dict[str, tuple], **kw) -> list[dict]:
    """One run per (preset, perplexity); runs: preset -> perplexities (or (perplexity, early)
    pairs) of its seeds."""
    out = []
    for preset, values in runs.items():
        for seed, v in enumerate(values):
            ppl, early = v if isinstance(v, tuple) else (v, None)
            out.append(make_run(sweep, f"cpu/{preset}", ppl, early=early, seed=seed, **kw))
    return out


def test_seeds_set_the_noise_band_and_the_error_bars():
    """Two seeds per model: a +1.6% rise is beyond the fixed 1% but within 2 SE of the seeds'
    spread (~2.8%, band ~5.7%), so more experts still help; the figures draw min-max bars."""
    seeded = _seeded("lm1b", {"MoE-4": (120, 125), "MoE-32": (122, 127), "MoE-256": (100, 104)})
    c = collect.frames(seeded)
    v = {x.key: x for x in report.verdicts(c.summary, c.snapshots)}["more_experts"]
    assert v.status == rules.REPRODUCED, v.reason
    assert "seed-to-seed SD 2.8% (pooled over 3 models, 2 seeds each)" in v.reason
    assert list(v.evidence["n_runs"]) == [2, 2, 2] and v.evidence["perplexity_sd"].notna().all()
    single = _seeded("lm1b", {"MoE-4": (122.5,), "MoE-32": (124.5,), "MoE-256": (102.0,)})
    assert _status("more_experts", single) == rules.NOT_REPRODUCED  # +1.6% > 1%
    fig = figures.figure2_left(c.summary)
    assert report_bars(fig.axes[1]) == 1  # one family with bars
    assert "min–max over seeds" in fig.axes[1].get_legend().get_title().get_text()
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [122.5, 124.5, 102.0]  # the means
    fig = figures.figure2_right(c.summary)
    assert report_bars(fig.axes[1]) == 1 and "min–max over seeds" in _titles(fig)[1]
    news = _seeded(
        "news100b",
        {
            "MoE-32": ((56.0, 81.0), (57.0, 82.0)),
            "MoE-256-h": ((52.0, 78.0), (53.0, 80.0)),
            "MoE-1024-h": ((50.0, 78.0),),
        },
    )
    c = collect.frames(news)
    fig = figures.figure3(c.summary, c.snapshots)
    assert "min–max over seeds" in _titles(fig)[1]
    assert report_bars(fig.axes[1]) == 2 and report_bars(fig.axes[3]) == 1
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [25.0, 26.5, 28.0]


def report_bars(ax) -> int:
    """The error-bar containers drawn on ax."""
    return sum(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)


# --- CLI ----------------------------------------------------------------------------------------


def _cli_inputs(tmp_path):
    for run in good_runs():
        write_run(tmp_path / "runs", run)
    bench = tmp_path / "bench.json"
    bench.write_text(bench_frame().to_json(orient="records"))
    out = tmp_path / "results"
    assert (
        cli.main(["collect", "--runs", str(tmp_path / "runs"), "--out", str(out / "summary.csv")])
        == 0
    )
    return out, bench


def _run_figures(out, bench, *extra: str) -> int:
    """`figures` on _cli_inputs' summary and bench, writing under out."""
    inputs = ["--summary", str(out / "summary.csv"), "--bench", str(bench), "--out", str(out)]
    return cli.main(["figures", *inputs, *extra])


@pytest.mark.integration
def test_cli_writes_figures_tables_and_report(tmp_path, monkeypatch):
    """Two figures here (drawing all six takes ~7 s; the slow test below draws them all)."""
    out, bench = _cli_inputs(tmp_path)
    monkeypatch.setattr(io, "FIGURE_DPI", 40)  # a small test scale: the files, not their looks
    only = ["figure3", "perf_scaling"]
    assert _run_figures(out, bench, "--no-mlflow", "--only", *only) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        f"{n}.{e}" for n in only for e in sorted(io.FIGURE_FORMATS)
    ]
    for name in only:
        for ext in io.FIGURE_FORMATS:
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    for name in ("table6", "table7", "table8"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 100
    assert "**reproduced**" in (out / "REPORT.md").read_text()
    assert not (out / "analysis").exists()


@pytest.mark.slow
def test_cli_logs_the_analysis_run_and_collects_from_mlflow(tmp_path, store, monkeypatch):
    out, bench = _cli_inputs(tmp_path)
    monkeypatch.setattr(io, "FIGURE_DPI", 40)
    assert _run_figures(out, bench, "--uri", store) == 0
    for name in figures.FIGURES:
        for ext in io.FIGURE_FORMATS:
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    exports = tracking.export_runs("analysis", tmp_path / "dl", tracking_uri=store)
    assert len(exports) == 1 and exports[0]["metrics"]["claim.balance"] == 1.0
    assert (exports[0]["dir"] / "figures" / "figure3.png").is_file()
    assert (exports[0]["dir"] / "REPORT.md").is_file()
    tracking.import_runs(
        sorted((tmp_path / "runs").glob("*/*")), experiment="cli", tracking_uri=store
    )
    csv = tmp_path / "mlflow" / "summary.csv"
    assert cli.main(["collect", "--from-mlflow", "cli", "--uri", store, "--out", str(csv)]) == 0
    a, b = io.read_csv(out / "summary.csv"), io.read_csv(csv)
    pd.testing.assert_frame_equal(a.drop(columns="run_dir"), b.drop(columns="run_dir"))


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["collect", "--runs", str(tmp_path / "nope")]) == 2
    assert cli.main(["collect", "--runs", str(tmp_path)]) == 2  # no finished run
    assert cli.main(["figures", "--summary", str(tmp_path / "none.csv"), "--no-mlflow"]) == 2
    bad = tmp_path / "s.csv"
    bad.write_text("run_id\n")
    assert cli.main(["figures", "--summary", str(bad), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


def test_config_yaml_written_by_write_run_is_a_full_config(tmp_path):
    path = write_run(tmp_path, make_run("lm1b", "cpu/MoE-32", 100.0))
    cfg = yaml.safe_load((path / rundir.CONFIG_FILE).read_text())
    assert cfg["model"]["preset"] == "cpu/MoE-32" and cfg["sweep"] == "lm1b"


@pytest.mark.parametrize("prefix", ["cpu/", "gpu/"])
def test_every_scaled_down_model_is_a_figure_2_model_of_the_paper(prefix):
    """The cpu/ and gpu/ families' models stand for Figure 2-left's (the LSTM baselines under the
    paper's name, collect.PAPER_NAME), so the figures and tables put each beside its paper row;
    the cpu/ family's budget models stand for Figure 2-right's, but for one intermediate LSTM."""
    from analysis import paper
    from moe_impl.model.presets import ALL_PRESETS

    names = [cfg.name for p, cfg in ALL_PRESETS.items() if p.startswith(prefix)]
    figure2 = {name for names in paper.FIGURE2_LEFT.values() for name in names}
    right = {m.rstrip("*") for m in paper.figure2_right_series()["model"]}
    covered = {collect.PAPER_NAME.get(name, name) for name in names}
    assert figure2 <= covered, sorted(figure2 - covered)
    if prefix == "cpu/":
        assert {"2xLSTM-8192-1024", "MoE-34M", "MoE-143M"} <= covered
    stand_ins = figure2 | right | {"LSTM-512-128"}
    assert all(collect.PAPER_NAME.get(n, n) in stand_ins or n.startswith("MoE-") for n in names)
