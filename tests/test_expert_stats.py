"""Per-expert statistics over training (issue 31, moe_impl/runs/expertstats.py): exact counts of a
layer whose routing is known, the balance metrics on constructed loads, the size bound at 131072
experts, resume equality, summary.json's keys, and training left bit for bit as it was."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY, losses, run_until_killed, tiny

from moe_impl.layer.flat import MoE
from moe_impl.runs import expertstats, rundir
from moe_impl.train import checkpoint
from moe_impl.train.config import load_config
from moe_impl.train.loop import Trainer

LOGGED = ("train.log_every=2",)  # a record every 2 steps: checkpoints (every 5) fall between


def onehot_layer(num_experts: int) -> MoE:
    """Top-1, no noise, w_gate = 10·I: a token x = e_i goes to expert i with gate 1 (Eq. 3-5)."""
    layer = MoE(num_experts, 4, num_experts, k=1, noisy_gating=False)
    with torch.no_grad():
        layer.gate.w_gate.copy_(10 * torch.eye(num_experts))
    return layer


def test_a_known_routing_gives_exact_counts_and_importance():
    num_experts, tokens = 6, 40
    layer = onehot_layer(num_experts)
    tally = expertstats.ExpertTally.new(num_experts)
    for step in (1, 2, 3):
        # token t is e_{t mod E}: expert e gets ⌊T/E⌋ + [e < T mod E] tokens, each with gate 1
        x = torch.eye(num_experts)[torch.arange(tokens) % num_experts]
        stats = layer(x).stats
        tally.add(step, stats.tokens_per_expert.numpy(), stats.importance.double().numpy())
    expected = 3 * (tokens // num_experts + (np.arange(num_experts) < tokens % num_experts))
    np.testing.assert_array_equal(tally.load, expected)
    np.testing.assert_allclose(tally.importance, expected)  # Importance = Σ gates = counts (k=1)
    metrics = expertstats.record(None, tally, 3, 3, window=2)
    assert metrics["max_violation"] == pytest.approx(21 / 20 - 1)  # max 7·3, mean 40·3/6
    assert metrics["dead_expert_fraction"] == 0.0
    assert metrics["top20_load_share"] == pytest.approx(2 * 21 / 120)  # ⌈0.2·6⌉ = 2 busiest
    assert tally.load.sum() == 0 and tally.steps == 0 and tally.last_record == 3


def test_max_violation_and_top_share_on_constructed_loads():
    assert expertstats.max_violation(np.full(16, 5)) == 0.0  # perfectly balanced
    assert expertstats.max_violation(np.array([8, 0, 0, 0])) == pytest.approx(3.0)  # 8 / 2 − 1
    assert math.isnan(expertstats.max_violation(np.zeros(4, np.int64)))
    load = np.arange(10)  # busiest 2: 9 + 8 of 45
    assert expertstats.top_load_share(load) == pytest.approx(17 / 45)
    assert expertstats.top_load_share(np.full(10, 3)) == pytest.approx(0.2)


def test_dead_expert_fraction_over_the_window():
    last_seen = np.array([0, 1, 5, 10, 11, 12])  # the last step each expert got a slot (0: never)
    # steps 10..12: experts last seen at 0, 1, 5 are dead
    assert expertstats.dead_expert_fraction(last_seen, 12, window=3) == pytest.approx(3 / 6)
    assert expertstats.dead_expert_fraction(last_seen, 12, window=8) == pytest.approx(2 / 6)
    # before a whole window has passed: dead = never routed a slot
    assert expertstats.dead_expert_fraction(last_seen, 12, window=100) == pytest.approx(1 / 6)


def test_dead_experts_follow_the_tally():
    tally = expertstats.ExpertTally.new(4)
    tally.add(1, np.array([1, 0, 0, 2]), np.zeros(4))
    tally.add(2, np.array([0, 0, 3, 0]), np.zeros(4))
    assert expertstats.record(None, tally, 2, 10, window=1)["dead_expert_fraction"] == 0.75
    assert expertstats.record(None, tally, 2, 10, window=2)["dead_expert_fraction"] == 0.25


def test_the_file_stays_small_at_131072_experts(tmp_path):
    """256 groups x 512 experts (both levels recorded), 100 records of a 1000-step run with all
    its snapshots; 10,000 records (100,000 steps at log_every 10) stay under 20 MB."""
    groups, size, every, total = 256, 512, 10, 1000
    rng = np.random.default_rng(0)
    tally = expertstats.ExpertTally.new(groups * size, groups)
    for step in range(every, total + 1, every):
        load = rng.poisson(16 * every, groups * size)
        tally.add(step, load, load * 0.25)
        expertstats.record(tmp_path, tally, step, total, window=100)
    folder = expertstats.stats_dir(tmp_path)
    assert len(list(folder.glob("step-*.npz"))) == expertstats.SNAPSHOTS
    size_now = sum(p.stat().st_size for p in folder.iterdir())
    row = len(expertstats.columns(True)) * 8
    assert size_now + (10_000 - total // every) * row < 20e6
    stats = expertstats.read_expert_stats(tmp_path)
    assert stats["records"]["step"].tolist() == list(range(every, total + 1, every))
    last = stats["snapshots"][total]
    assert last["load"].dtype == np.int32 and last["group_load"].shape == (groups,)


def test_a_partial_last_row_is_dropped(tmp_path):
    tally = expertstats.ExpertTally.new(4)
    for step in (1, 2):
        tally.add(step, np.array([1, 2, 3, 4]), np.ones(4))
        expertstats.record(tmp_path, tally, step, 2, window=10)
    with open(expertstats.stats_dir(tmp_path) / expertstats.RECORDS_FILE, "ab") as f:
        f.write(b"\0" * 12)  # killed mid-write
    assert expertstats.read_expert_stats(tmp_path)["records"]["step"].tolist() == [1.0, 2.0]


def _compare_stats(a, b) -> None:
    sa, sb = expertstats.read_expert_stats(a), expertstats.read_expert_stats(b)
    assert sa["layout"] == sb["layout"]
    assert sa["records"].keys() == sb["records"].keys()
    for key in sa["records"]:
        np.testing.assert_array_equal(sa["records"][key], sb["records"][key])
    assert sa["snapshots"].keys() == sb["snapshots"].keys()
    for step, snap in sa["snapshots"].items():
        for key, value in snap.items():
            np.testing.assert_array_equal(value, sb["snapshots"][step][key])
    folder = expertstats.RECORDS_FILE
    assert (a / "expert_stats" / folder).read_bytes() == (b / "expert_stats" / folder).read_bytes()


def _balance(run_dir) -> list[dict]:
    return [
        {k: r.get(k) for k in expertstats.METRICS}
        for r in rundir.read_metrics(run_dir)
        if r["kind"] == "train"
    ]


def test_a_resumed_run_records_what_an_uninterrupted_one_does(tmp_path):
    whole = Trainer(tiny(*LOGGED), tmp_path / "whole").run()
    run_until_killed(Trainer(tiny(*LOGGED), tmp_path / "killed"), at_step=8)
    assert checkpoint.latest(tmp_path / "killed").name == "step-00000005.pt"
    # rows (and snapshots) at steps 2, 4, 6, 8 were written before the kill, after step 5
    killed = expertstats.read_expert_stats(tmp_path / "killed")
    assert killed["records"]["step"].tolist() == [2.0, 4.0, 6.0, 8.0]
    resumed = Trainer(tiny(*LOGGED), tmp_path / "killed", resume=True).run()
    _compare_stats(tmp_path / "whole", tmp_path / "killed")
    assert _balance(tmp_path / "whole") == _balance(tmp_path / "killed")
    for key in expertstats.METRICS:
        assert resumed[key] == whole[key]


def test_summary_carries_the_balance_metrics_and_dense_runs_null(tmp_path):
    moe = Trainer(tiny(), tmp_path / "moe").run()
    assert moe["max_violation"] >= 0 and moe["dead_expert_fraction"] == 0.0
    assert 0.2 <= moe["top20_load_share"] <= 1
    logged = [r for r in rundir.read_metrics(tmp_path / "moe") if "max_violation" in r]
    assert [r["step"] for r in logged] == [10, 12]  # train.log_every and the last step
    assert logged[-1]["max_violation"] == moe["max_violation"]
    dense_keys = ("model.num_experts", "model.k", "model.d_hidden")
    dense = [s for s in TINY if not s.startswith(dense_keys)]
    lstm = load_config([], [*dense, "model.preset=cpu/4xLSTM-64"])
    summary = Trainer(lstm, tmp_path / "lstm").run()
    for key in expertstats.METRICS:
        assert key in rundir.SUMMARY_KEYS and summary[key] is None
    assert expertstats.read_expert_stats(tmp_path / "lstm") is None


def test_a_hierarchical_run_records_both_levels(tmp_path):
    hier = [s for s in TINY if not s.startswith("model.k=")]
    more = ["model.preset=cpu/MoE-0.5M", "model.num_groups=2", "model.group_size=4"]
    more += ["model.k_primary=1", "model.k_secondary=2"]
    Trainer(load_config([], [*hier, *more]), tmp_path / "h").run()
    stats = expertstats.read_expert_stats(tmp_path / "h")
    assert stats["layout"]["num_groups"] == 2 and stats["layout"]["num_experts"] == 8
    snap = stats["snapshots"][12]
    np.testing.assert_array_equal(snap["group_load"], snap["load"].reshape(2, 4).sum(1))
    # a group's Importance is the primary gate's (Eq. 13 summed over j): one per token and step
    tokens = 2 * 8 * 24  # 2 steps of 8 x 24 positions, k_primary = 1
    assert snap["group_importance"].sum() == pytest.approx(tokens, rel=1e-5)


def test_recording_leaves_the_training_bit_for_bit(tmp_path, monkeypatch):
    Trainer(tiny(*LOGGED), tmp_path / "recorded").run()
    monkeypatch.setattr(Trainer, "_tally", lambda self, *args: None)
    Trainer(tiny(*LOGGED), tmp_path / "plain").run()
    assert expertstats.read_expert_stats(tmp_path / "plain") is None
    assert losses(tmp_path / "recorded") == losses(tmp_path / "plain")
    a, b = (
        checkpoint.load(checkpoint.latest(tmp_path / d), "cpu", rank=0, world_size=1)["model"]
        for d in ("recorded", "plain")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_group_metrics_come_from_the_groups_of_experts():
    tally = expertstats.ExpertTally.new(6, num_groups=2)  # groups {0, 1, 2} and {3, 4, 5}
    tally.add(1, np.array([3, 0, 0, 0, 0, 0]), np.zeros(6), (0.5, 0.1, 0.4))
    tally.add(2, np.array([1, 0, 0, 0, 2, 0]), np.zeros(6), (0.7, 0.3, 0.6))
    metrics = expertstats.record(None, tally, 2, 10, window=1)
    # group loads 4 and 2: MaxVio = 4 / 3 − 1; the busiest 20% of 2 groups is one group
    assert metrics["group_max_violation"] == pytest.approx(1 / 3)
    assert metrics["group_top20_load_share"] == pytest.approx(4 / 6)
    assert metrics["group_dead_fraction"] == 0.0  # each group had a slot at step 2
    assert metrics["dead_expert_fraction"] == pytest.approx(4 / 6)
    # the entropies: means over the record's steps
    assert metrics["gate_entropy"] == pytest.approx(0.6)
    assert metrics["primary_gate_entropy"] == pytest.approx(0.2)
    assert metrics["secondary_gate_entropy"] == pytest.approx(0.5)
    tally.add(3, np.array([0, 0, 0, 5, 0, 0]), np.zeros(6), (0.1, 0.0, 0.1))
    later = expertstats.record(None, tally, 3, 10, window=1)
    assert later["group_dead_fraction"] == 0.5 and later["gate_entropy"] == pytest.approx(0.1)


def test_a_flat_tally_has_no_group_metrics_and_old_checkpoints_load():
    tally = expertstats.ExpertTally.new(4)
    tally.add(1, np.array([1, 1, 1, 1]), np.zeros(4), (0.25, None, None))
    metrics = expertstats.record(None, tally, 1, 10, window=5)
    assert tuple(metrics) == expertstats.EXPERT_METRICS and metrics["gate_entropy"] == 0.25
    saved = tally.to_dict()
    for key in ("entropy", "entropy_steps"):  # a checkpoint from before the entropies
        del saved[key]
    old = expertstats.ExpertTally.from_dict(saved)
    old.add(2, np.array([1, 0, 0, 0]), np.zeros(4), (0.5, None, None))
    assert expertstats.record(None, old, 2, 10, window=5)["gate_entropy"] == 0.5


def test_a_file_begun_under_an_older_layout_keeps_its_columns(tmp_path):
    tally = expertstats.ExpertTally.new(4)
    expertstats.write_layout(tmp_path, tally, 10, 5)
    layout_path = expertstats.stats_dir(tmp_path) / expertstats.LAYOUT_FILE
    layout = json.loads(layout_path.read_text())
    old = [c for c in layout["columns"] if c != "gate_entropy"]  # VERSION 1's columns
    layout_path.write_text(json.dumps({**layout, "version": 1, "columns": old}))
    tally.add(1, np.array([2, 0, 1, 1]), np.zeros(4), (0.3, None, None))
    expertstats.record(tmp_path, tally, 1, 10, window=5)
    records = expertstats.read_expert_stats(tmp_path)["records"]
    assert list(records) == old and records["max_violation"].tolist() == [1.0]


def test_a_hierarchical_run_logs_each_levels_metrics(tmp_path):
    hier = [s for s in TINY if not s.startswith("model.k=")]
    more = ["model.preset=cpu/MoE-0.5M", "model.num_groups=2", "model.group_size=4"]
    more += ["model.k_primary=1", "model.k_secondary=2"]
    summary = Trainer(load_config([], [*hier, *more]), tmp_path / "h").run()
    logged = [r for r in rundir.read_metrics(tmp_path / "h") if "gate_entropy" in r]
    assert [r["step"] for r in logged] == [10, 12]
    for key in expertstats.METRICS:
        assert logged[-1][key] == summary[key] and summary[key] is not None
    # one group per token (k_primary = 1): the primary gate is 1, its entropy 0, and the whole
    # gate's entropy is the secondary gate's (the chain rule), each at most ln 2
    assert summary["primary_gate_entropy"] == 0.0
    assert summary["gate_entropy"] == pytest.approx(summary["secondary_gate_entropy"], rel=1e-9)
    assert 0 < summary["secondary_gate_entropy"] <= math.log(2)
    records = expertstats.read_expert_stats(tmp_path / "h")["records"]
    assert records["group_max_violation"][-1] == pytest.approx(summary["group_max_violation"])
