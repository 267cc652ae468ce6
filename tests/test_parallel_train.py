"""Expert-parallel training (`python -m moe_impl train` in several gloo processes) against the
one-process run: same losses, same final weights, and a 2-rank checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HIER_16, TINY, losses, run_until_killed, set_args
from parallel_workers import train_run

from moe_impl.parallel import spawn
from moe_impl.runs import expertstats
from moe_impl.train import checkpoint
from moe_impl.train.config import load_config
from moe_impl.train.loop import Trainer

pytestmark = pytest.mark.integration  # every test spawns a process group

HIER = [*HIER_16, "model.sparse_grad=true"]
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
    # the per-expert statistics (rank 0 writes them, from the layer's global counts): the same
    # loads and the same metrics as one process's, the entropies summed over ranks
    single_stats = expertstats.read_expert_stats(tmp_path / "single")
    dist_stats = expertstats.read_expert_stats(out)
    assert dist_stats["layout"] == single_stats["layout"]
    assert dist_stats["snapshots"].keys() == single_stats["snapshots"].keys()
    for step, snap in single_stats["snapshots"].items():
        assert (dist_stats["snapshots"][step]["load"] == snap["load"]).all()
    for name, column in single_stats["records"].items():
        torch.testing.assert_close(
            torch.tensor(dist_stats["records"][name]), torch.tensor(column), rtol=1e-5, atol=1e-6
        )
    for key in expertstats.METRICS:  # the group metrics are null for a flat run
        if summary[key] is None:
            assert dist_summary[key] is None, key
        else:
            assert dist_summary[key] == pytest.approx(summary[key], rel=1e-5), key


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
    other = checkpoint.load(latest, rank=1, world_size=2)["model"]  # its experts only
    assert set(other) == {
        "moe.secondary_gate.w_gate",
        "moe.secondary_gate.w_noise",
        "moe.experts.w_in",
        "moe.experts.w_out",
    }
    resumed = spawn(train_run, 2, (overrides, str(cut), True), timeout_s=240)
    assert losses(cut) == losses(tmp_path / "whole")
    assert resumed[0]["summary"]["test_nll"] == whole[0]["summary"]["test_nll"]
    for name, value in whole[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name


def test_a_checkpoint_reshards_to_another_number_of_processes(tmp_path):
    """A 2-rank checkpoint resumed by 1 process and by 4, and a 1-process checkpoint resumed by 2:
    all finish with the losses of the uninterrupted one-process run (replicated noise)."""
    import shutil

    overrides = [*TINY, *HIER, *REPLICATE]
    single, _ = single_process(tmp_path, overrides)
    want = torch.tensor(losses(tmp_path / "single"))

    two = tmp_path / "two"
    spawn(train_run, 2, (overrides, str(two), False, 8), timeout_s=240)
    shutil.copytree(two, tmp_path / "two_to_four")
    Trainer(load_config([], overrides), two, resume=True).run()  # resumed by one process
    spawn(train_run, 4, (overrides, str(tmp_path / "two_to_four"), True), timeout_s=240)

    one = tmp_path / "one"
    run_until_killed(Trainer(load_config([], overrides), one), at_step=8)
    assert checkpoint.latest(one).name == "step-00000005.pt"
    spawn(train_run, 2, (overrides, str(one), True), timeout_s=240)

    for run in (two, tmp_path / "two_to_four", one):
        got = torch.tensor(losses(run))
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-6, msg=lambda m, r=run: f"{r}: {m}"
        )
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test_nll"] == pytest.approx(single["test_nll"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_launch_logs_one_mlflow_run(tmp_path):
    """The README's command: torchrun starts 2 processes of `python -m moe_impl train`; rank 0
    alone prints, writes the run directory and logs to MLflow (one run, every step once)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*TINY[:-1], "tracking.enabled=true", f"tracking.uri={uri}", "experiment=dist"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "-m",
        "moe_impl",
        "train",
        "--out",
        str(tmp_path / "run"),
        *set_args(sets),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test perplexity") == 1  # one report, from rank 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert sorted(p.name for p in checkpoint.latest(tmp_path / "run").iterdir()) == [
        "rank-00000-of-00002.pt",
        "rank-00001-of-00002.pt",
    ]
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["dist"])
        assert len(runs) == 1
        history = mlflow.MlflowClient(uri).get_metric_history(runs.run_id[0], "train/loss")
        steps = [m.step for m in history]
        assert steps and len(steps) == len(set(steps))  # logged, and by one process only
        assert runs["metrics.test_perplexity"][0] == pytest.approx(summary["test_perplexity"])
    finally:
        mlflow.set_tracking_uri(None)


SRUN = """#!/usr/bin/env bash
# stand-in for `srun --nodes=N --ntasks-per-node=1 CMD...`: N copies of CMD on this machine
nodes=1
while [[ $1 == --* ]]; do case $1 in --nodes=*) nodes=${1#--nodes=};; esac; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_multi_node_launch_through_srun(tmp_path):
    """workflow/scripts/launch.sh with 2 nodes inside a (simulated) SLURM allocation: srun starts
    one torchrun per node, joined by the c10d rendezvous on the first node; the run equals the
    one-process run (replicated noise)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(SRUN)
    (shims / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "MOE_RDZV_PORT": str(port),
    }
    overrides = [*TINY, *REPLICATE]
    launch = Path(__file__).parents[1] / "workflow" / "scripts" / "launch.sh"
    cmd = ["bash", str(launch), "1", "2", "train", "--out", str(tmp_path / "run")]
    cmd += set_args(overrides)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    single, _ = single_process(tmp_path, overrides)
    assert summary["test_nll"] == pytest.approx(single["test_nll"], rel=1e-5)


def test_lm1b_with_carried_state_matches_one_process(tmp_path):
    """LM1B's layout (fixture): rank 0 encodes the corpus first, each rank carries the LSTM state of
    its own rows across steps, and 2 ranks score every test word once, as one process does."""
    from helpers import SCORED_TEST, lm1b_overrides, make_archive

    root = make_archive(tmp_path / "data")
    overrides = [*TINY, *lm1b_overrides(root), *REPLICATE]
    single, _ = single_process(tmp_path, overrides)
    ranks = spawn(train_run, 2, (overrides, str(tmp_path / "dist")), timeout_s=240)
    assert ranks[0]["summary"]["eval_scored_tokens"] == single["eval_scored_tokens"] == SCORED_TEST
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "dist")),
        torch.tensor(losses(tmp_path / "single")),
        rtol=1e-5,
        atol=1e-6,
    )
    assert ranks[0]["summary"]["test_nll"] == pytest.approx(single["test_nll"], rel=1e-5)
