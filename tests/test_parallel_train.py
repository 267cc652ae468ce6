"""Expert-parallel training (`python -m moe_impl train` in several gloo processes) against the
one-process run: same losses, same final weights, and a 2-rank checkpoint that resumes exactly."""

from __future__ import annotations

import pytest
import torch
from parallel_workers import train_run
from test_train import TINY, losses

from moe_impl import checkpoint
from moe_impl.parallel import spawn
from moe_impl.train import Trainer
from moe_impl.train_config import load_config

HIER = [
    "model.preset=cpu/MoE-256-h", "model.num_experts=16", "model.num_groups=4",
    "model.group_size=4", "model.k_primary=2", "model.k_secondary=2", "model.k=null",
    "model.sparse_grad=true",
]  # fmt: skip
REPLICATE = ["distributed.replicate_noise=true"]


def single_process(tmp_path, overrides):
    trainer = Trainer(load_config([], overrides), tmp_path / "single")
    return trainer.run(), trainer.model.state_dict()


@pytest.mark.parametrize(
    ("world", "extra"), [(2, []), (4, HIER)], ids=["flat-2-ranks", "hierarchical-4-ranks"]
)
def test_distributed_training_matches_one_process(tmp_path, world, extra):
    overrides = [*TINY, *extra, *REPLICATE]
    summary, weights = single_process(tmp_path, overrides)
    out = tmp_path / "dist"
    ranks = spawn(train_run, world, (overrides, str(out)), timeout_s=240)
    got, want = losses(out), losses(tmp_path / "single")
    assert len(got) == len(want) == summary["steps"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    dist_summary = ranks[0]["summary"]
    assert dist_summary["world_size"] == world and dist_summary["backend"] == "gloo"
    assert dist_summary["test_nll"] == pytest.approx(summary["test_nll"], rel=1e-4)
    assert dist_summary["eval_scored_tokens"] == summary["eval_scored_tokens"]
    for name, value in weights.items():  # the gathered experts and every replicated layer
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-6)
    assert (out / "summary.json").exists() and (out / "expert_load.json").exists()


def test_local_noise_still_trains(tmp_path):
    """Without replicate_noise each rank draws its own noise: another run, as good a one."""
    overrides = [*TINY]
    summary, _ = single_process(tmp_path, overrides)
    ranks = spawn(train_run, 2, (overrides, str(tmp_path / "dist")), timeout_s=240)
    got = losses(tmp_path / "dist")
    assert got != losses(tmp_path / "single")
    assert got[-1] < got[0]
    assert ranks[0]["summary"]["test_nll"] == pytest.approx(summary["test_nll"], rel=0.05)


def test_a_two_rank_checkpoint_resumes_exactly(tmp_path):
    overrides = [*TINY, *HIER]
    whole = spawn(train_run, 2, (overrides, str(tmp_path / "whole")), timeout_s=240)
    cut = tmp_path / "cut"
    killed = spawn(train_run, 2, (overrides, str(cut), False, 8), timeout_s=240)
    assert [r["killed_at"] for r in killed] == [8, 8]
    latest = checkpoint.latest(cut)
    assert latest.name == "step-00000005" and latest.is_dir()
    assert sorted(p.name for p in latest.iterdir()) == [
        "rank-00000-of-00002.pt",
        "rank-00001-of-00002.pt",
    ]
    with pytest.raises(ValueError, match="number of processes that wrote it"):
        Trainer(load_config([], overrides), cut, resume=True)  # one process cannot take it
    resumed = spawn(train_run, 2, (overrides, str(cut), True), timeout_s=240)
    assert losses(cut) == losses(tmp_path / "whole")
    assert resumed[0]["summary"]["test_nll"] == whole[0]["summary"]["test_nll"]
    for name, value in whole[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name
