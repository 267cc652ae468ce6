"""moe_impl/runs/runsummary.py, summary.json as a type: the trainer's build_summary writes exactly
its fields in their order, every key rundir.py promises is one, its "regime" is
moe_impl/model/regime.py's, `from_dict` reads older and MLflow-derived summaries, and `column`
names summary.csv's columns, refusing a name that is no field."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from moe_impl.model import regime
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.runs import expertstats, rundir
from moe_impl.runs.runsummary import UNIGRAM_PERPLEXITY, Regime, RunSummary, column
from moe_impl.train.config import load_config, model_config
from moe_impl.train.corpus import build_corpus
from moe_impl.train.state import STATS, LoopState
from moe_impl.train.summary import build_summary

FIELDS = [f.name for f in dataclasses.fields(RunSummary)]


def test_the_promised_keys_and_the_trainers_blocks_are_fields():
    assert set(rundir.SUMMARY_KEYS) <= set(FIELDS)
    i = FIELDS.index(STATS[0])
    assert FIELDS[i : i + len(STATS) + len(expertstats.METRICS)] == [*STATS, *expertstats.METRICS]


def test_the_regime_is_model_regimes():
    d = regime.regime(ALL_PRESETS["cpu/MoE-32"], tokens_per_step=512, steps=10, sweep="news100b")
    assert list(d) == [f.name for f in dataclasses.fields(Regime)]
    assert dataclasses.asdict(Regime.from_dict(d)) == d


def test_build_summary_writes_the_fields_in_their_order():
    cfg = load_config(
        overrides=["model.preset=cpu/MoE-32", "tracking.enabled=false", "eval.tokens=256"]
    )
    corpus = build_corpus(cfg)
    model = model_config(cfg, corpus.vocab_size)
    loop = LoopState(
        step=40,
        train_time=2.0,
        scored_tokens=999,
        recent_stats=[dict.fromkeys(STATS, 0.5), dict.fromkeys(STATS, 1.5)],
        expert_tally=SimpleNamespace(latest={"max_violation": 0.25}),
    )
    final = {"split": "test", "perplexity": 55.5, "nll": math.log(55.5), "excess_nll": None}
    summary = build_summary(
        name="x",
        preset="cpu/MoE-32",
        sweep="lm1b",
        corpus=corpus,
        evaluation=cfg.eval,
        model=model,
        final={**final, "oracle_nll": 3.0, "scored_tokens": 256},
        loop=loop,
        tokens_per_step=512,
        wall_time=3.5,
        peak_flops=None,
        peak_flops_source="unknown",
        peak_memory_mb=12.0,
        expert_optimizer="adam",
        device=torch.device("cpu"),
        world_size=1,
        backend=None,
        dtype="float32",
    )
    assert isinstance(summary, RunSummary) and isinstance(summary.regime, Regime)
    written = summary.to_dict()
    assert list(written) == FIELDS
    assert list(written["regime"]) == [f.name for f in dataclasses.fields(Regime)]
    assert RunSummary.from_dict(written) == summary
    assert summary.train_tokens == 40 * 512 and summary.tokens_per_second == 40 * 512 / 2
    assert summary.cv_load == 1.0 and summary.max_violation == 0.25
    assert summary.gate_entropy is None and summary.prefetch_workers == 0
    assert summary.corpus is not None and summary.corpus[UNIGRAM_PERPLEXITY] > 1


def test_from_dict_reads_a_partial_summary():
    """A summary rebuilt from MLflow metrics, or written before a field existed: missing fields
    take their defaults, unknown keys (the GPU sampler's) are dropped."""
    s = RunSummary.from_dict(
        {"test_perplexity": 5.0, "gpu_util": 0.9, "regime": {"batch_positions": 8, "new": 1}}
    )
    assert (s.test_perplexity, s.eval_split, s.model, s.snapshots) == (5.0, "test", None, None)
    assert s.regime == Regime(batch_positions=8)


def test_column_names_summary_csvs_columns():
    assert column("regime", "batch_positions") == "regime.batch_positions"
    assert column("corpus", UNIGRAM_PERPLEXITY) == "corpus.unigram_perplexity"
    assert column("floor_nll") == "floor_nll"
    with pytest.raises(ValueError, match="no field 'regim'"):
        column("regim")
    with pytest.raises(ValueError, match="'regime' has no field 'batch'"):
        column("regime", "batch")
