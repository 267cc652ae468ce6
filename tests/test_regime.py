"""summary.json's training regime beside the paper's (moe_impl/model/regime.py), checked against
numbers worked out by hand from Sec. 3.1, App. C.1, App. D and Tables 7 and 8; the unigram
perplexity of the evaluated tokens (moe_impl/data/unigram.py) against its closed form; and both
reaching MLflow's final metrics (runs/runinfo.py, final_metrics).

Unit tier: no training."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_impl.data.base import Batch
from moe_impl.data.synthetic import TopicMarkov, TopicMarkovConfig
from moe_impl.data.unigram import eval_unigram_perplexity, scored_targets, unigram_perplexity
from moe_impl.model import flops
from moe_impl.model.presets import ALL_PRESETS, PRESETS
from moe_impl.model.regime import (
    LM1B_REGIME,
    NEWS100B_REGIME,
    PAPER_NAME,
    experts_per_token,
    paper_preset,
    regime,
)
from moe_impl.runs.runinfo import final_metrics
from moe_impl.train.config import EvalSection
from moe_impl.train.summary import corpus_dict

PAPER_KEYS = ("batch_positions", "tokens_per_expert_per_step", "tokens_per_parameter", "steps")


def test_the_paper_budgets():
    """App. C.1: ~300,000 words per batch, 27,000 steps (10 epochs), ~8.1B tokens; App. D:
    ~2.5M words per batch, ~40,000 steps, ~100B words."""
    assert (LM1B_REGIME.batch_positions, LM1B_REGIME.steps) == (300_000, 27_000)
    assert LM1B_REGIME.train_tokens == 8_100_000_000
    assert (NEWS100B_REGIME.batch_positions, NEWS100B_REGIME.steps) == (2_500_000, 40_000)
    assert NEWS100B_REGIME.train_tokens == 100_000_000_000


def test_moe_4096_h_on_1b_by_hand():
    """300,000 · (2·2) / 4096 ≈ 293 positions per expert per step (Sec. 3.1's k·b/n); 8.1e9 tokens
    over Table 7's 4303.4M parameters excluding embedding and softmax ≈ 1.9 per parameter."""
    model = ALL_PRESETS["cpu/MoE-4096-h"]
    out = regime(model, tokens_per_step=4096, steps=10, sweep="lm1b")
    assert out["paper_preset"] == "lm1b/MoE-4096-h"
    assert out["paper_batch_positions"] == 300_000 and out["paper_steps"] == 27_000
    assert out["paper_tokens_per_expert_per_step"] == pytest.approx(292.96875)
    assert out["paper_tokens_per_parameter"] == pytest.approx(8.1e9 / 4303.4e6, rel=1e-4)
    assert round(out["paper_tokens_per_parameter"], 1) == 1.9
    # the run's own: 4096 positions, 4 of 4096 experts each -> 4 per expert per step
    assert out["batch_positions"] == 4096 and out["steps"] == 10
    assert out["experts_per_token"] == 4 and out["tokens_per_expert_per_step"] == 4.0
    params = flops.params_excl_embedding_softmax(model)
    assert out["tokens_per_parameter"] == pytest.approx(40960 / params)


def test_news100b_uses_app_d_and_its_own_preset():
    """MoE-131072-h (Table 8: 137577.6M parameters): 2.5M · 4 / 131072 ≈ 76.3 per expert per step,
    1e11 / 1.375776e11 ≈ 0.73 tokens per parameter. Any other sweep name is the 1B regime."""
    model = ALL_PRESETS["cpu/MoE-131072-h"]
    out = regime(model, tokens_per_step=4096, steps=1, sweep="news100b")
    assert out["paper_preset"] == "news100b/MoE-131072-h"
    assert (out["paper_batch_positions"], out["paper_steps"]) == (2_500_000, 40_000)
    assert out["paper_tokens_per_expert_per_step"] == pytest.approx(2.5e6 * 4 / 131072)
    assert out["paper_tokens_per_parameter"] == pytest.approx(1e11 / 137577.6e6, rel=1e-4)
    # no 131072-expert model in Table 7: on the 1B regime it has no paper values
    other = regime(model, tokens_per_step=4096, steps=1, sweep="balance")
    assert other["paper_preset"] is None
    assert all(other[f"paper_{k}"] is None for k in PAPER_KEYS)


def test_baselines_and_dense_experts():
    """The CPU family's 4xLSTM-64 stands for 4xLSTM-512 (Table 7: 8.4M parameters): no experts,
    ~964 tokens per parameter; MoE-1-Wide's one always-active expert gets the whole batch."""
    lstm = regime(ALL_PRESETS["cpu/4xLSTM-64"], tokens_per_step=4096, steps=2, sweep="lm1b")
    assert lstm["paper_preset"] == "lm1b/4xLSTM-512"
    assert lstm["experts_per_token"] is None and lstm["tokens_per_expert_per_step"] is None
    assert lstm["paper_tokens_per_expert_per_step"] is None
    assert lstm["paper_tokens_per_parameter"] == pytest.approx(8.1e9 / 8.4e6, rel=0.01)
    assert paper_preset("LSTM-256-64", "lm1b") == "lm1b/LSTM-2048-512"
    assert paper_preset("4xLSTM-64", "news100b") == "news100b/4xLSTM-512"
    assert paper_preset("LSTM-256-64", "news100b") is None  # not in Table 8
    wide = regime(ALL_PRESETS["cpu/MoE-1-Wide"], tokens_per_step=4096, steps=2, sweep=None)
    assert wide["experts_per_token"] == 1 and wide["tokens_per_expert_per_step"] == 4096
    assert wide["paper_tokens_per_expert_per_step"] == 300_000


def test_every_paper_name_is_a_paper_preset_and_every_family_member_maps():
    assert all(f"lm1b/{name}" in PRESETS for name in PAPER_NAME.values())
    for key, model in ALL_PRESETS.items():
        if key.split("/")[0] in ("cpu", "gpu") and model.moe in ("flat", "hierarchical"):
            k = experts_per_token(model)
            assert k == (model.k if model.moe == "flat" else model.k_primary * model.k_secondary)
    assert experts_per_token(ALL_PRESETS["lm1b/MoE-256"]) == 4


def test_unigram_perplexity_closed_form():
    """[0, 0, 1, 2]: p = (1/2, 1/4, 1/4), H = 1.5 ln 2, perplexity 2^1.5; chunks of any sizes
    add up; V equally frequent ids give V."""
    assert unigram_perplexity([np.array([0, 0, 1, 2])]) == pytest.approx(2**1.5)
    assert unigram_perplexity([np.array([2]), np.array([], dtype=int), np.array([0, 0, 1])]) == (
        pytest.approx(2**1.5)
    )
    assert unigram_perplexity([np.arange(7), np.arange(7)]) == pytest.approx(7.0)
    assert unigram_perplexity([np.array([5, 5, 5])]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no tokens"):
        unigram_perplexity([np.array([], dtype=int)])


def test_only_scored_targets_count():
    """The tokens an evaluation scores: targets where `scored` (padding and headers are not)."""
    batch = Batch(
        inputs=np.zeros((2, 3), dtype=np.int64),
        targets=np.array([[0, 0, 9], [1, 2, 9]]),
        scored=np.array([[True, True, False], [True, True, False]]),
        oracle_logp=None,
    )
    assert unigram_perplexity(scored_targets([batch])) == pytest.approx(2**1.5)


def test_the_synthetic_corpus_lies_between_its_floor_and_its_vocabulary():
    """Defaults: floor perplexity exp(floor_nats) ≈ 4.05 < unigram < 577 (the vocabulary); the
    evaluated tokens, and so the value, depend on eval.tokens only, not the batch shape."""
    corpus = TopicMarkov(TopicMarkovConfig())
    value = eval_unigram_perplexity(corpus, "test", 32, 128, 100_000)
    assert math.exp(corpus.floor_nats()) < value < corpus.vocab_size
    assert eval_unigram_perplexity(corpus, "test", 8, 64, 100_000) == pytest.approx(value)
    described = corpus_dict(corpus, "test", EvalSection())  # eval's defaults: 100,000 tokens
    assert described["unigram_perplexity"] == pytest.approx(value)
    assert described["vocab_size"] == corpus.vocab_size  # describe()'s keys kept


def test_regime_and_unigram_perplexity_are_final_mlflow_metrics():
    out = regime(ALL_PRESETS["cpu/MoE-4096-h"], tokens_per_step=4096, steps=10, sweep="lm1b")
    summary = {
        "test_nll": 1.5,
        "steps": 10,
        "regime": out,
        "corpus": {"corpus": "synthetic", "unigram_perplexity": 109.0},
    }
    metrics = final_metrics(summary)
    assert metrics["test_nll"] == 1.5 and metrics["corpus.unigram_perplexity"] == 109.0
    assert metrics["regime.tokens_per_expert_per_step"] == 4.0
    assert metrics["regime.paper_tokens_per_expert_per_step"] == pytest.approx(292.96875)
    assert "regime.paper_preset" not in metrics and "corpus.corpus" not in metrics
    # an older summary without either: the SUMMARY_KEYS metrics only
    assert final_metrics({"test_nll": 1.5}) == {"test_nll": 1.5}
