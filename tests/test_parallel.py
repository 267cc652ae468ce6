"""Expert parallelism (moe_impl.parallel) against the single-process layers, in spawned gloo
processes: outputs, aux loss, counts and every gradient equal (float64), with 2 and 4 ranks, ranks
without tokens and ranks whose experts receive none, and with the routing compiled on every rank."""

from __future__ import annotations

import pytest
import torch
from parallel_workers import reference, run_cases

from moe_impl import MoEConfig
from moe_impl.parallel import DistributedMoE, spawn
from moe_impl.parallel.routing import shard_bounds

# sizes: tokens on each rank (rank order = the single-process batch order)
CASES = {
    2: [
        dict(kind="flat", seed=1, experts=6, k=2, sizes=[6, 5]),
        dict(kind="hier", seed=2, shape=(4, 3), k=(2, 2), sizes=[5, 4]),
        dict(kind="flat", seed=3, experts=4, k=1, sizes=[3, 6], noisy=False),  # true-count load
        dict(kind="hier", seed=4, shape=(3, 4), k=(1, 3), sizes=[7, 2], train=False),
        # routing compiled (model.compile) on every rank: equal to the eager single process
        dict(kind="flat", seed=12, experts=6, k=2, sizes=[6, 5], compile=True),
        dict(kind="hier", seed=13, shape=(4, 3), k=(2, 2), sizes=[5, 4], compile=True),
    ],
    4: [
        dict(kind="flat", seed=5, experts=6, k=2, sizes=[5, 0, 7, 3]),  # a rank without tokens
        dict(kind="flat", seed=6, experts=3, k=2, sizes=[5, 1, 7, 3], sparse=True),  # 0 experts
        dict(kind="hier", seed=7, shape=(6, 3), k=(2, 2), sizes=[4, 6, 0, 5]),
        dict(kind="hier", seed=8, shape=(5, 2), k=(2, 1), sizes=[3, 3, 3, 3], sparse=True),
        dict(kind="flat", seed=9, experts=8, k=2, sizes=[4, 5, 3, 6], starve=2),  # rank 3 idle
        dict(kind="hier", seed=10, shape=(8, 2), k=(2, 2), sizes=[4, 5, 3, 6], starve=2),
        dict(kind="hier", seed=11, shape=(4, 3), k=(2, 2), sizes=[4, 6, 2, 5], train=False),
    ],
}
IDS = [(w, i) for w, cases in CASES.items() for i in range(len(cases))]


@pytest.fixture(scope="module")
def results():
    """One spawn per world size runs all its cases (process start-up dominates)."""
    return {w: spawn(run_cases, w, (cases,), timeout_s=180) for w, cases in CASES.items()}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("world", "index"), IDS, ids=[f"w{w}-{CASES[w][i]['kind']}{i}" for w, i in IDS]
)
def test_distributed_layer_equals_single_process(results, world, index):
    case = CASES[world][index]
    ref = reference(case)
    ranks = [res[index] for res in results[world]]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), ref["y"])
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"])
    for r in ranks:  # the global loss and statistics on every rank
        torch.testing.assert_close(r["aux"], ref["aux"])
        assert torch.equal(r["counts"], ref["counts"])
        torch.testing.assert_close(r["entropy"], ref["entropy"], rtol=1e-12, atol=1e-12)
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, msg=lambda m, n=name: f"{n}: {m}")
    assert all(r["world"] == world for r in ranks)
    assert all(r["compiled"] == case.get("compile", False) for r in ranks)


def test_cases_cover_idle_ranks():
    """The starved cases really leave the last rank's experts without a single token."""
    for case in (c for c in CASES[4] if c.get("starve")):
        counts = reference(case)["counts"]
        items = case["experts"] if case["kind"] == "flat" else case["shape"][0]
        bounds = shard_bounds(items, 4)
        per_item = 1 if case["kind"] == "flat" else case["shape"][1]
        assert int(counts[bounds[3] * per_item :].sum()) == 0
        assert int(counts[: bounds[3] * per_item].sum()) > 0


def test_shard_bounds_cover_every_item_once():
    assert shard_bounds(6, 4) == [0, 1, 3, 4, 6]
    assert shard_bounds(3, 4) == [0, 0, 1, 2, 3]
    assert shard_bounds(16, 16) == list(range(17))


def test_without_process_group_the_error_says_what_to_do():
    with pytest.raises(ValueError, match="init_process_group"):
        DistributedMoE(MoEConfig(d_model=4, d_hidden=8, num_experts=4, k=2))


def test_each_process_takes_its_own_gpu(monkeypatch):
    from moe_impl.train.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: as configured
    with pytest.raises(ValueError, match=r"set train\.device=cuda"):
        resolve_device("cuda:1", local_rank=0)


def test_backend_must_fit_the_device():
    from moe_impl.parallel.launch import resolve_backend

    assert resolve_backend("auto", "cuda") == "nccl" and resolve_backend("auto", "cpu") == "gloo"
    with pytest.raises(ValueError, match="nccl"):
        resolve_backend("gloo", "cuda")
    with pytest.raises(ValueError, match="gloo on CPU"):
        resolve_backend("nccl", "cpu")


def test_checkpoint_folders_survive_a_change_of_process_count(tmp_path):
    """A 2-process run killed while writing step 30 (one rank file), resumed by 4 processes that
    write step 30 again: the folder is complete for 4, the stale file goes, and pruning removes
    everything older than the kept checkpoints (partial folders and .tmp files too)."""
    from moe_impl.train import checkpoint

    folder = tmp_path / "checkpoints"
    (folder / "step-00000030").mkdir(parents=True)
    torch.save({"w": 2}, folder / "step-00000030" / "rank-00000-of-00002.pt")
    (folder / "step-00000010.pt.tmp").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) is None  # the partial folder is not a checkpoint

    def save_all(step: int) -> None:
        for rank in (1, 2, 3, 0):  # rank 0 last: it names the checkpoint once all have written
            checkpoint.save(tmp_path, step, {"rank": rank}, keep=2, rank=rank, world_size=4)

    save_all(30)
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step-00000030" and checkpoint.world_size_of(latest) == 4
    assert len(list(latest.iterdir())) == 4
    assert checkpoint.load(latest, rank=2, world_size=4) == {"rank": 2}
    save_all(40)
    save_all(50)
    assert sorted(p.name for p in folder.iterdir()) == [
        "latest.txt",
        "step-00000040",
        "step-00000050",
    ]
