"""Reliability of MLflow tracking: a run's metrics reach MLflow exactly once per step whatever the
path (live, killed then `--resume`, resumed after finishing, imported with `tracking import`), and a
live run and the same run directory imported have the same history (docs/tracking.md).

Integration tier: tiny in-process runs that log to the session's temporary MLflow store
(tests/conftest.py), each test in its own experiment."""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

import pytest
from helpers import Killed, run_until_killed, tiny

from moe_impl import tracking
from moe_impl.cli import main
from moe_impl.runs import rundir
from moe_impl.train import checkpoint, loop
from moe_impl.train.loop import Trainer

pytestmark = pytest.mark.integration  # every test opens an MLflow store


def tracked(experiment: str, *more: str) -> dict:
    """The TINY run with MLflow on (the session's store, MLFLOW_TRACKING_URI) in `experiment`."""
    return tiny("tracking.enabled=true", f"experiment={experiment}", *more)


def mlflow_run_id(run_dir: Path) -> str:
    return rundir.read_json(run_dir / rundir.RUN_FILE)[tracking.MLFLOW_RUN_KEY]


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric key: [(step, value), ...] in step order} of an MLflow run, without the system
    metrics (wall-clock samples of the machine, which only a live run has)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.resolve_tracking_uri())
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in sorted(run.data.metrics)
        if not key.startswith("system/")
    }


def run_status(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.resolve_tracking_uri()).get_run(run_id).info.status


def doubled(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[int]]:
    """{key: steps with more than one point}, for the keys that have any."""
    out = {}
    for key, points in history.items():
        steps = [s for s, _ in points]
        if twice := sorted({s for s in steps if steps.count(s) > 1}):
            out[key] = twice
    return out


@pytest.mark.parametrize(
    ("checkpoint_every", "resumes_at"),
    [(5, 5), (100, 0)],
    ids=["from-a-checkpoint", "before-the-first-checkpoint"],
)
def test_killed_then_resumed_logs_each_step_once(tmp_path, checkpoint_every, resumes_at):
    """Killed before step 8 trains, after MLflow got steps 1..8 (the tracker flushes every few
    seconds, so a kill -9 finds the steps since the last checkpoint logged); --resume trains
    them again and MLflow keeps one point per (key, step)."""
    cfg = tracked(
        f"rel-killed-{checkpoint_every}",
        "train.log_every=2",
        f"train.checkpoint_every={checkpoint_every}",
    )
    out = tmp_path / "run"
    run_until_killed(Trainer(cfg, out), at_step=8)
    latest = checkpoint.latest(out)
    want = f"step-{resumes_at:08d}.pt" if resumes_at else None
    assert (latest.name if latest else None) == want
    run_id = mlflow_run_id(out)
    assert [s for s, _ in histories(run_id)["train/loss"]] == [2, 4, 6, 8]  # all in MLflow

    summary = Trainer(cfg, out, resume=True).run()
    assert mlflow_run_id(out) == run_id
    history = histories(run_id)
    assert doubled(history) == {}
    assert [s for s, _ in history["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in history["train/tokens_per_second"]] == [2, 4, 6, 8, 10, 12]
    assert history["test_perplexity"] == [(12, pytest.approx(summary["test_perplexity"]))]
    assert run_status(run_id) == "FINISHED"


def test_resuming_a_finished_run_logs_nothing(tmp_path, capsys):
    cfg = tracked("rel-finished")
    out = tmp_path / "run"
    Trainer(cfg, out).run()
    run_id = mlflow_run_id(out)
    before = histories(run_id)
    assert [s for s, _ in before["test_perplexity"]] == [12]
    assert main(["train", "--out", str(out), "--resume"]) == 0  # the CLI, as users and Snakemake
    assert "test perplexity" in capsys.readouterr().out
    Trainer(cfg, out, resume=True).run()  # and the library
    assert histories(run_id) == before
    assert run_status(run_id) == "FINISHED"


@pytest.mark.parametrize("how", ["summary-deleted", "killed-after-the-final-evaluation"])
def test_a_resumed_final_evaluation_is_not_logged_twice(tmp_path, monkeypatch, how):
    """The run resumes from its last checkpoint (step 12) and evaluates again: after Snakemake
    deleted the outputs of a job it reruns (summary.json), or when the job was killed between the
    final evaluation and summary.json. MLflow keeps the first points of the final evaluation and
    the summary metrics (the same values, but for the wall-clock ones)."""
    cfg = tracked(f"rel-{how}")
    out = tmp_path / "run"
    if how == "summary-deleted":
        Trainer(cfg, out).run()
        (out / rundir.SUMMARY_FILE).unlink()
    else:
        with monkeypatch.context() as patch, pytest.raises(Killed):
            patch.setattr(loop, "build_summary", dies)
            Trainer(cfg, out).run()
    run_id = mlflow_run_id(out)
    before = histories(run_id)
    assert [s for s, _ in before["test/perplexity"]] == [12]
    summary = Trainer(cfg, out, resume=True).run()
    after = histories(run_id)
    assert doubled(after) == {}
    assert [s for s, _ in after["test/perplexity"]] == [12]
    assert after["test_perplexity"] == [(12, pytest.approx(summary["test_perplexity"]))]
    assert {k: v for k, v in after.items() if k in before} == before
    assert run_status(run_id) == "FINISHED"


def dies(*args, **kwargs):
    raise Killed


def test_live_and_imported_runs_have_the_same_history(tmp_path):
    """A live run (log_every 4: steps 4, 8, 12) and a copy of its run directory imported into
    another experiment (the copy gets its own run id, else the import finds the live run) log
    the same keys, steps and values."""
    live_dir = tmp_path / "live"
    Trainer(tracked("rel-live", "train.log_every=4"), live_dir).run()
    copy = tmp_path / "copy"
    shutil.copytree(live_dir, copy)
    identity = rundir.read_json(copy / rundir.RUN_FILE)
    identity = {k: v for k, v in identity.items() if not k.startswith("mlflow_")}
    rundir.write_json(copy / rundir.RUN_FILE, {**identity, "run_id": uuid.uuid4().hex})

    (imported_id,) = tracking.import_runs([copy], experiment="rel-imported")
    live, imported = histories(mlflow_run_id(live_dir)), histories(imported_id)
    assert [s for s, _ in live["train/loss"]] == [4, 8, 12]
    assert imported == live
    assert doubled(live) == {}
    assert tracking.import_runs([copy], experiment="rel-imported") == [imported_id]
    assert histories(imported_id) == live  # importing again adds nothing


def test_steps_of_a_segment_without_tracking_reach_mlflow_when_the_run_finishes(
    tmp_path, monkeypatch
):
    """The store could not be reached until the kill (tracking off, warned once); the resumed
    segment creates the MLflow run from its checkpoint on, and before the run is tagged complete
    (which a later `tracking import` trusts) the steps before come from metrics.jsonl."""
    cfg = tracked("rel-gap", "train.log_every=2")
    out = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.warns(tracking.TrackingWarning):
        patch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())
        run_until_killed(Trainer(cfg, out), at_step=8)
    assert tracking.MLFLOW_RUN_KEY not in rundir.read_json(out / rundir.RUN_FILE)
    Trainer(cfg, out, resume=True).run()
    run_id = mlflow_run_id(out)
    history = histories(run_id)
    assert doubled(history) == {}
    assert [s for s, _ in history["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert tracking.import_runs([out]) == [run_id]
    assert histories(run_id) == history


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
