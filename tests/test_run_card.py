"""What a run tells the MLflow UI about itself, without MLflow: its name (runinfo.display_name), its
card (moe_impl/train/card.py: description, dataset) and the experiment's saved view
(moe_impl/tracking/view.py). The store side is in tests/test_tracking.py, the rendered page in
tests/test_mlflow_ui.py."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from moe_impl.data.synthetic import TopicMarkov
from moe_impl.model import flops
from moe_impl.model.presets import PAPER_VALUES
from moe_impl.runs import rundir, runinfo
from moe_impl.tracking import view
from moe_impl.train import card
from moe_impl.train.config import dump, load_config


@pytest.mark.parametrize(
    ("name", "sweep", "seed", "want"),
    [
        ("MoE-32", "lm1b", 0, "lm1b/MoE-32"),
        ("MoE-32_seed1", "lm1b", 1, "lm1b/MoE-32/seed1"),  # the workflow's run-directory name
        ("MoE-32", "lm1b", 2, "lm1b/MoE-32/seed2"),  # a name without the suffix
        ("MoE-256_wi0.1_wl0.1_seed1", "balance", 1, "balance/MoE-256_wi0.1_wl0.1/seed1"),
        ("MoE-4", None, 0, "MoE-4"),  # a run of its own, outside any sweep
        ("_seed1", None, 1, "_seed1/seed1"),  # nothing left to name: the suffix stays
    ],
)
def test_display_name(name, sweep, seed, want):
    assert runinfo.display_name(name, sweep, seed) == want


SMALL_DATA = ["data.synthetic.vocab_size=48", "data.synthetic.num_topics=4", "train.tokens=2304"]
SMALL_DATA += ["train.batch_size=8", "train.seq_len=24"]


def card_of(*overrides: str) -> tuple[dict, object]:
    cfg = load_config([], [*SMALL_DATA, *overrides])
    corpus = TopicMarkov(cfg.data.synthetic)
    model = cfg.model.resolve(corpus.vocab_size)
    return card.run_card(cfg, model, corpus.describe()), model


def test_card_describes_the_model_its_budget_and_the_papers_number():
    got, model = card_of(
        "model.preset=cpu/MoE-32", "sweep=lm1b", "name=MoE-32_seed1", "train.seed=1"
    )
    assert got["display_name"] == "lm1b/MoE-32/seed1"
    text = got["description"]
    assert text.startswith("**lm1b/MoE-32/seed1**: `cpu/MoE-32`, flat MoE, 32 experts, top-4;")
    assert f"{flops.ops_per_timestep(model):,} ops/timestep" in text
    assert "2,304 training tokens" in text and "batch 8 × 24, seed 1" in text
    assert "synthetic TopicMarkov (4 topics" in text
    row = PAPER_VALUES["lm1b/MoE-32"]
    assert f"test perplexity {row.ppl_10_epochs} after 10 epochs" in text and "Table 7" in text
    assert got["dataset"] == card.corpus_dataset(
        TopicMarkov(load_config([], SMALL_DATA).data.synthetic).describe()
    )


def test_card_takes_the_sweeps_table_then_lm1b_and_says_when_the_paper_has_none():
    news, _ = card_of("model.preset=cpu/MoE-1024-h", "sweep=news100b")
    row = PAPER_VALUES["news100b/MoE-1024-h"]
    assert (
        "Table 8" in news["description"]
        and "hierarchical MoE, 1024 experts" in (news["description"])
    )
    assert (
        f"{row.ppl_10B_words} after 10B words, {row.ppl_100B_words} after 100B words"
        in (news["description"])
    )
    balance, _ = card_of("model.preset=cpu/MoE-256", "sweep=balance")
    assert "`lm1b/MoE-256`" in balance["description"]
    custom, _ = card_of(
        "model.preset=cpu/MoE-1024-h", "model.num_experts=2048", "model.group_size=64"
    )
    assert "hierarchical MoE, 2048 experts (32 groups of 64), top-2 + 2" in custom["description"]
    assert "has no row for this model" in custom["description"]
    lstm, _ = card_of("model.preset=cpu/4xLSTM-64")
    assert "no MoE layer, LSTM" in lstm["description"]


def test_dataset_digest_names_the_data_not_where_it_lies():
    cfg = load_config([], SMALL_DATA)
    facts = TopicMarkov(cfg.data.synthetic).describe()
    a = card.corpus_dataset(facts)
    moved = card.corpus_dataset({**facts, "root": "/elsewhere", "unigram_perplexity": 3.0})
    other = card.corpus_dataset({**facts, "num_topics": facts["num_topics"] + 1})
    assert a == {**moved, "name": a["name"]} and a["digest"] == moved["digest"]
    assert other["digest"] != a["digest"] and len(a["digest"]) == card.DIGEST_CHARS
    assert a["source_type"] == "code" and json.loads(a["profile"])["num_topics"] == 4
    text = card.corpus_dataset({"corpus": "lm1b", "root": "/data/lm1b", "vocab_size": 793471})
    assert text["name"] == "lm1b (lm1b)" and text["source_type"] == "local"
    assert json.loads(text["source"]) == {"uri": "file:///data/lm1b"}


def test_ensure_card_builds_the_card_of_an_old_run_directory(tmp_path):
    """A run directory from before cards: built from config.yaml and summary.json, the same card
    the trainer would have written, and stored in run.json."""
    cfg = load_config([], ["model.preset=cpu/MoE-4", "sweep=lm1b", "name=MoE-4"])
    corpus = TopicMarkov(cfg.data.synthetic)
    (tmp_path / rundir.CONFIG_FILE).write_text(dump(cfg))
    runinfo.write_run_identity(tmp_path, "MoE-4", "moe")
    summary = {"corpus": {**corpus.describe(), "unigram_perplexity": 80.0}}
    rundir.write_json(tmp_path / rundir.SUMMARY_FILE, summary)
    live = card.run_card(cfg, cfg.model.resolve(corpus.vocab_size), corpus.describe())
    assert card.ensure_card(tmp_path) == live
    assert rundir.read_json(tmp_path / rundir.RUN_FILE)[runinfo.CARD_KEY] == live
    assert card.ensure_card(tmp_path / "missing") is None


def test_run_identity_keeps_its_id_and_takes_the_newest_card(tmp_path):
    first = runinfo.write_run_identity(tmp_path, "MoE-4", "moe", {"display_name": "a"})
    again = runinfo.write_run_identity(tmp_path, "MoE-4", "moe", {"display_name": "b"})
    assert again["run_id"] == first["run_id"] and again[runinfo.CARD_KEY] == {"display_name": "b"}
    assert runinfo.write_run_identity(tmp_path, "MoE-4", "moe")[runinfo.CARD_KEY] == {
        "display_name": "b"
    }


def test_experiment_tags_fill_in_what_is_missing_and_renew_an_old_view():
    new = view.experiment_tags("moe", {}, now_ms=5)
    assert new[view.KIND_TAG] == "custom_model_development"
    assert "moe" in new[view.NOTE_TAG]
    envelope = json.loads(new[view.VIEW_TAG_PREFIX + view.VIEW_KEY])
    assert isinstance(envelope["name"], str) and envelope["createdAt"] == 5
    state = json.loads(envelope["state"])  # MLflow's envelope holds the state as a string
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "sweep"}]
    assert "metrics.`test_perplexity`" in state["selectedColumns"]
    assert state["orderByKey"] == "metrics.`test_perplexity`"
    assert view.experiment_tags("moe", new) == {}  # idempotent
    edited = {**new, view.NOTE_TAG: "mine", view.VIEW_VERSION_TAG: "0"}
    renewed = view.experiment_tags("moe", edited)
    assert set(renewed) == {view.VIEW_TAG_PREFIX + view.VIEW_KEY, view.VIEW_VERSION_TAG}
    # the analysis experiment holds no training runs: its kind, nothing else
    assert view.experiment_tags("analysis", {}, runs_view=False) == {view.KIND_TAG: view.KIND}


def test_a_sweep_view_shows_that_sweep_alone():
    state = view.view_state("lm1b")
    assert state["searchFilter"] == "tags.sweep = 'lm1b'" and state["groupBy"] is None
    assert state["orderByKey"] == view.view_state()["orderByKey"]
    tags = view.sweep_view_tags("lm1b", {}, now_ms=3)
    envelope = json.loads(tags[view.VIEW_TAG_PREFIX + "moe-sweep-lm1b"])
    assert envelope["name"] == "Sweep lm1b alone" and json.loads(envelope["state"]) == state
    assert view.sweep_view_tags("lm1b", tags) == {}  # added once
    assert view.sweep_view_tags("", {}) == {} and view.sweep_view_tags("a'b", {}) == {}
    assert view.sweep_view_key("my sweep/2") == "moe-sweep-my_sweep_2"


def test_experiment_url_opens_the_training_runs_in_the_saved_view():
    url = view.experiment_url("http://127.0.0.1:5000/", "7")
    parts = urlsplit(url)
    assert parts.fragment.startswith("/experiments/7/runs?")
    query = parse_qs(parts.fragment.split("?", 1)[1])
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": [view.VIEW_KEY]}
