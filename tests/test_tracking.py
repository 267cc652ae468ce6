"""moe_impl.tracking against real MLflow stores (SQLite in tmp, a real `mlflow server`); no mocks.

Run directories are written here per rundir.py's contract; the store is shared per module
because creating one costs seconds (69 Alembic migrations, docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import free_port

from moe_impl import cli, tracking
from moe_impl.runs import rundir, runinfo

EXP = "test-exp"
CONFIG = {
    "model": {"name": "cpu/MoE-4", "num_experts": 4, "k": 2, "hidden": [64, 32]},
    "train": {"lr": 0.001, "seed": 0, "device": "cpu"},
}


def write_run_dir(path: Path, *, steps: int = 4, finished: bool = True, name="cpu/MoE-4") -> Path:
    """A run directory as a training job leaves it (rundir.py), with one plot."""
    path.mkdir(parents=True, exist_ok=True)
    (path / rundir.CONFIG_FILE).write_text(yaml.safe_dump(CONFIG))
    identity = runinfo.write_run_identity(path, name, EXP)
    for step in range(steps):
        rundir.append_metrics(
            path,
            {
                "kind": "train",
                "step": step,
                "tokens": 64 * (step + 1),
                "loss": 5.0 - 0.5 * step,
                "aux_loss": None,
                "lr": 0.001,
                "cv_load": 0.1,
                "time": identity["started"] + step,
            },
        )
    rundir.append_metrics(
        path,
        {
            "kind": "eval",
            "step": steps - 1,
            "split": "valid",
            "nll": 3.0,
            "perplexity": 20.1,
            "excess_nll": None,
            "time": identity["started"] + steps,
        },
    )
    if finished:
        summary = dict.fromkeys(rundir.SUMMARY_KEYS)
        summary.update(
            test_perplexity=20.0,
            test_nll=3.0,
            params_total=1234,
            tokens_per_second=9.5,
            steps=steps,
            mfu=math.nan,
        )
        rundir.write_json(path / rundir.SUMMARY_FILE, summary)
    (path / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def track_live(run_dir: Path, uri: str, **kwargs) -> tracking.RunTracker:
    """Replay a run directory through a live tracker, as the training loop would."""
    tracker = tracking.RunTracker.start(
        run_dir, config=CONFIG, experiment=EXP, run_name="cpu/MoE-4", tracking_uri=uri, **kwargs
    )
    for record in rundir.read_metrics(run_dir):
        tracker.log_record(record)
    return tracker


def runs_tagged(uri: str, moe_run_id: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        flt = f"tags.`{tracking.RUN_ID_TAG}` = '{moe_run_id}'"
        return mlflow.search_runs(search_all_experiments=True, filter_string=flt)
    finally:
        mlflow.set_tracking_uri(None)


def history_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def artifact_names(uri: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    return {a.path for a in MlflowClient(uri).list_artifacts(run_id)}


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = "sqlite:///" + (tmp_path_factory.mktemp("store") / "mlflow.db").as_posix()
    assert tracking.init_store(uri, EXP) == uri
    assert tracking.init_store(uri, EXP) == uri  # idempotent
    return uri


@pytest.fixture(autouse=True)
def _tmp_default_store(tmp_path, monkeypatch):
    # nothing a test does may land in the repository's results/
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + (tmp_path / "env.db").as_posix())


@pytest.mark.integration
def test_live_run_is_queryable(store, tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    tracker = track_live(run_dir, store, tags={"sweep": "experts"})
    assert tracker.active
    tracker.finish(rundir.read_summary(run_dir))
    assert not tracker.active
    identity = rundir.read_json(run_dir / rundir.RUN_FILE)
    assert identity[tracking.MLFLOW_RUN_KEY] == tracker.run_id
    (row,) = runs_tagged(store, identity["run_id"]).to_dict("records")
    assert row["status"] == "FINISHED" and row["tags.mlflow.runName"] == "cpu/MoE-4"
    assert row["params.model.num_experts"] == "4" and row["params.model.hidden"] == "[64, 32]"
    assert row["params.train.lr"] == "0.001"
    for key in (
        "train/loss",
        "train/cv_load",
        "valid/perplexity",
        "test_perplexity",
        "test_nll",
        "params_total",
        "tokens_per_second",
        "steps",
    ):
        assert not math.isnan(row[f"metrics.{key}"]), key
    for absent in ("metrics.mfu", "metrics.train/aux_loss", "metrics.valid/excess_nll"):
        assert absent not in row or math.isnan(row[absent])  # null / NaN is never logged
    assert row["metrics.test_perplexity"] == 20.0
    for tag in (
        "git_commit",
        "git_dirty",
        "host",
        "torch_version",
        "mlflow_version",
        "device_name",
    ):
        assert row[f"tags.{tag}"], tag
    assert row["tags.experiment"] == EXP and row["tags.sweep"] == "experts"
    assert row[f"tags.{tracking.COMPLETE_TAG}"] == "true"
    assert history_steps(store, tracker.run_id, "train/loss") == [0, 1, 2, 3]
    artifacts = artifact_names(store, tracker.run_id)
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss.png"} <= artifacts
    root = tracking.artifact_root(store)
    assert (root / EXP / tracker.run_id / "artifacts" / "config.yaml").is_file()


@pytest.mark.integration
def test_resume_continues_the_same_run(store, tmp_path):
    run_dir = write_run_dir(tmp_path / "run", finished=False)
    first = track_live(run_dir, store, system_metrics_interval_s=None)
    first.flush()  # then the job is killed: no finish
    write_run_dir(run_dir)  # resumed job appends and finishes
    second = track_live(run_dir, store, system_metrics_interval_s=None)
    assert second.run_id == first.run_id
    second.finish()
    (row,) = runs_tagged(store, rundir.read_json(run_dir / "run.json")["run_id"]).to_dict("records")
    assert row["status"] == "FINISHED"


_CHILD = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    from moe_impl import tracking
    warnings.simplefilter("error", tracking.TrackingWarning)  # tracking off = failure
    run_dir, uri = Path(sys.argv[1]), sys.argv[2]
    tracker = tracking.RunTracker.start(run_dir, config={"i": run_dir.name},
        experiment="test-exp", run_name=run_dir.name, tracking_uri=uri,
        system_metrics_interval_s=None)
    for step in range(25):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
        tracker.flush()  # one transaction per step: the contended case
    tracker.finish({"test_perplexity": 2.0})
    print(tracker.run_id)
""")


def run_parallel_jobs(uri: str, tmp_path: Path, n: int = 4) -> None:
    """n processes each track a run at once; every one must log all its points."""
    dirs = [write_run_dir(tmp_path / f"job{i}", finished=False) for i in range(n)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(d), uri],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in dirs
    ]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    for d, (out, _) in zip(dirs, results, strict=True):
        (row,) = runs_tagged(uri, rundir.read_json(d / "run.json")["run_id"]).to_dict("records")
        assert row["run_id"] == out.strip() and row["status"] == "FINISHED"
        assert history_steps(uri, row["run_id"], "train/loss") == list(range(25))


@pytest.mark.integration
def test_parallel_processes_after_init_store(store, tmp_path):
    run_parallel_jobs(store, tmp_path)


@pytest.mark.slow  # a fresh store: each process pays the migrations' lock wait
def test_parallel_processes_on_a_fresh_store_serialize_its_creation(tmp_path):
    # without init_store MLflow's own migrations race (docs/tracking.md); tracking's file lock
    run_parallel_jobs("sqlite:///" + (tmp_path / "fresh" / "mlflow.db").as_posix(), tmp_path)


@pytest.mark.integration
def test_unreachable_store_warns_once_then_imports_once(store, tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = track_live(run_dir, closed_port_uri())
        tracker.log_metrics({"x": 1.0}, 99)
        tracker.log_artifacts([run_dir / "loss.png"])
        tracker.finish(rundir.read_summary(run_dir))  # no exception
    assert time.monotonic() - t0 < 10
    assert not tracker.active and tracker.run_id is None
    tracking_warnings = [w for w in caught if issubclass(w.category, tracking.TrackingWarning)]
    assert len(tracking_warnings) == 1 and "\n" not in str(tracking_warnings[0].message)
    assert "tracking import" in str(tracking_warnings[0].message)

    (run_id,) = tracking.import_runs([run_dir], tracking_uri=store)
    assert tracking.import_runs([run_dir], tracking_uri=store) == [run_id]  # no duplicate
    (row,) = runs_tagged(store, rundir.read_json(run_dir / "run.json")["run_id"]).to_dict("records")
    assert row["run_id"] == run_id and row["status"] == "FINISHED"
    assert row["params.model.num_experts"] == "4" and row["metrics.test_nll"] == 3.0
    assert row[f"tags.{tracking.IMPORTED_TAG}"] == "true"
    assert history_steps(store, run_id, "train/loss") == [0, 1, 2, 3]
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss.png"} <= artifact_names(
        store, run_id
    )


@pytest.mark.integration
def test_import_completes_a_partial_live_run_without_duplicates(store, tmp_path):
    run_dir = write_run_dir(tmp_path / "run", steps=2, finished=False)
    live = track_live(run_dir, store, system_metrics_interval_s=None)
    live.flush()  # the store goes away here; the job finishes offline
    run_dir = write_run_dir(run_dir, steps=4)  # rewrites steps 0..3 after the first two
    (run_id,) = tracking.import_runs([run_dir], tracking_uri=store)
    assert run_id == live.run_id
    steps = history_steps(store, run_id, "train/loss")
    assert steps == [0, 1, 2, 3]  # 0 and 1 were logged live and are not repeated
    assert len(runs_tagged(store, rundir.read_json(run_dir / "run.json")["run_id"])) == 1


@pytest.mark.integration
def test_import_skips_unfinished_and_rejects_non_run_dirs(store, tmp_path, caplog):
    unfinished = write_run_dir(tmp_path / "unfinished", finished=False)
    assert tracking.import_runs([unfinished], tracking_uri=store) == []
    assert "unfinished" in caplog.text
    with pytest.raises(ValueError, match="not a run directory"):
        tracking.import_runs([tmp_path / "nothing"], tracking_uri=store)
    with pytest.raises(ValueError, match="unreachable"):
        tracking.import_runs([unfinished], tracking_uri=closed_port_uri())


@pytest.mark.integration
def test_cli_init_and_import(store, tmp_path, capsys):
    run_dir = write_run_dir(tmp_path / "run")
    assert cli.main(["tracking", "init", "--uri", store, "--experiment", EXP]) == 0
    assert cli.main(["tracking", "import", str(run_dir), "--uri", store]) == 0
    assert "1 of 1" in capsys.readouterr().out
    assert cli.main(["tracking", "import", str(tmp_path), "--uri", store]) == 2
    assert cli.main(["tracking", "ui", "--port", "0", "--uri", store]) == 2
    assert cli.main(["tracking", "init", "--uri", "mlruns"]) == 2


def with_card(run_dir: Path, name: str, digest: str = "d1") -> dict:
    """Give a run directory the card the trainer writes into run.json (moe_impl/train/card.py)."""
    card = {
        "display_name": name,
        "description": f"**{name}**: a test run.",
        "dataset": {
            "name": "synthetic",
            "digest": digest,
            "source_type": "code",
            "source": "{}",
            "profile": "{}",
        },
    }
    runinfo.write_run_identity(run_dir, name, EXP, card)
    return card


def mlflow_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id)


@pytest.mark.integration
def test_a_run_carries_its_card_and_its_experiment_the_ui_view(store, tmp_path):
    """Run name, description and dataset from the card; resumed, nothing is logged twice; the
    experiment is a machine-learning one with our saved view (moe_impl/tracking/view.py)."""
    run_dir = write_run_dir(tmp_path / "run", finished=False)
    with_card(run_dir, "lm1b/MoE-4/seed1")
    first = track_live(run_dir, store, system_metrics_interval_s=None)
    first.flush()
    write_run_dir(run_dir)
    again = track_live(run_dir, store, system_metrics_interval_s=None)  # resumed
    assert again.run_id == first.run_id
    again.finish(rundir.read_summary(run_dir))
    run = mlflow_run(store, again.run_id)
    assert run.info.run_name == "lm1b/MoE-4/seed1"
    assert run.data.tags["mlflow.source.name"] == "python -m moe_impl train"
    assert run.data.tags[tracking.view.NOTE_TAG] == "**lm1b/MoE-4/seed1**: a test run."
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("synthetic", "d1")
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]

    from mlflow.tracking import MlflowClient

    tags = MlflowClient(store).get_experiment_by_name(EXP).tags
    assert tags[tracking.view.KIND_TAG] == "custom_model_development"
    saved = json.loads(tags[tracking.view.VIEW_TAG_PREFIX + tracking.view.VIEW_KEY])
    assert saved["name"] == tracking.view.VIEW_NAME
    exp_id = MlflowClient(store).get_experiment_by_name(EXP).experiment_id
    MlflowClient(store).set_experiment_tag(exp_id, tracking.view.VIEW_VERSION_TAG, "0")  # older
    ((_, url),) = [u for u in tracking.experiment_urls(store, "http://h:1") if u[0] == EXP]
    assert url == tracking.view.experiment_url("http://h:1", exp_id)
    renewed = MlflowClient(store).get_experiment(exp_id).tags  # the UI gets the current view
    assert renewed[tracking.view.VIEW_VERSION_TAG] == str(tracking.view.VIEW_VERSION)
    # a store from before the view: an experiment of training runs gets it, others do not
    old = MlflowClient(store).create_experiment("before-views")
    MlflowClient(store).create_run(old, tags={tracking.RUN_ID_TAG: "x", "sweep": "lm1b"})
    other = MlflowClient(store).create_experiment("other-runs")
    MlflowClient(store).create_run(other, tags={tracking.RUN_ID_TAG: "y", "kind": "analysis"})
    names = [name for name, _ in tracking.experiment_urls(store, "http://h:1")]
    assert "before-views" in names and "other-runs" not in names
    assert tracking.view.VIEW_VERSION_TAG in MlflowClient(store).get_experiment(old).tags


@pytest.mark.integration
def test_a_replaced_run_gives_up_its_name(tmp_path):
    """A run directory set aside for a changed config (docs/workflow.md) and the new run in its
    place: the new run takes the name, the old one is renamed and tagged, export reads the new one.
    Two runs that merely share a name are both kept as they are."""
    from moe_impl.train.identity import set_aside

    uri = "sqlite:///" + (tmp_path / "mlflow.db").as_posix()
    run_dir = write_run_dir(tmp_path / "runs" / "MoE-4")
    with_card(run_dir, "lm1b/MoE-4")
    (old_id,) = tracking.import_runs([run_dir], tracking_uri=uri)
    twin = write_run_dir(tmp_path / "elsewhere" / "MoE-4")  # same name, not a replacement
    with_card(twin, "lm1b/MoE-4")
    (twin_id,) = tracking.import_runs([twin], tracking_uri=uri)
    assert mlflow_run(uri, old_id).info.run_name == "lm1b/MoE-4"  # untouched by its namesake
    set_aside(run_dir)
    write_run_dir(run_dir)
    with_card(run_dir, "lm1b/MoE-4")
    new = track_live(run_dir, uri, system_metrics_interval_s=None)
    new.finish(rundir.read_summary(run_dir))
    old = mlflow_run(uri, old_id)
    assert old.info.run_name.startswith("lm1b/MoE-4 (replaced 20")
    new_moe_id = rundir.read_json(run_dir / rundir.RUN_FILE)["run_id"]
    assert old.data.tags[tracking.REPLACED_TAG] == new_moe_id
    assert mlflow_run(uri, new.run_id).info.run_name == "lm1b/MoE-4"
    assert mlflow_run(uri, twin_id).info.run_name == "lm1b/MoE-4"
    exported = tracking.export_runs(EXP, tmp_path / "export", tracking_uri=uri)
    assert sorted(e["mlflow_run_id"] for e in exported) == sorted([new.run_id, twin_id])


@pytest.mark.integration
def test_import_names_a_run_without_a_card_from_its_config(tmp_path, capsys):
    """A run directory written before cards (and whose config train cannot read back, so no card
    can be built): `sweep/name/seedS` from config.yaml, and the sweep tag the runs page groups by."""
    uri = "sqlite:///" + (tmp_path / "mlflow.db").as_posix()
    run_dir = write_run_dir(tmp_path / "run", name="MoE-4_seed3")
    config = {**CONFIG, "sweep": "news100b", "train": {**CONFIG["train"], "seed": 3}}
    (run_dir / rundir.CONFIG_FILE).write_text(yaml.safe_dump(config))
    assert cli.main(["tracking", "import", str(run_dir), "--uri", uri]) == 0
    (row,) = runs_tagged(uri, rundir.read_json(run_dir / "run.json")["run_id"]).to_dict("records")
    assert row["tags.mlflow.runName"] == "news100b/MoE-4/seed3" and row["tags.sweep"] == "news100b"
    from mlflow.tracking import MlflowClient

    exp_tags = MlflowClient(uri).get_experiment_by_name(EXP).tags  # its sweep's own view
    assert tracking.view.VIEW_TAG_PREFIX + "moe-sweep-news100b" in exp_tags
    assert (
        cli.main(["tracking", "init", "--uri", uri, "--experiment", "a", "--experiment", "b"]) == 0
    )
    assert "'a', 'b'" in capsys.readouterr().out
    names = {name for name, _ in tracking.experiment_urls(uri, "http://h:1")}
    assert {"a", "b", EXP} <= names


def test_uri_resolution(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = tracking.resolve_tracking_uri()
    assert default == f"sqlite:///{tmp_path}/results/mlflow.db" and default.startswith(
        "sqlite:////"
    )
    assert tracking.artifact_root(default) == tmp_path / "results" / "mlartifacts"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"
    cmd = tracking.server_command("127.0.0.1", 5055)  # the default store, not the env server
    assert cmd[cmd.index("--backend-store-uri") + 1] == default
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "results/mlartifacts")


@dataclasses.dataclass
class _Moe:
    k: int = 2
    num_experts: int = 8


@dataclasses.dataclass
class _Cfg:
    moe: _Moe = dataclasses.field(default_factory=_Moe)
    lr: float = 0.1


def test_only_the_store_module_imports_mlflow():
    package = Path(tracking.__file__).resolve().parents[1]
    importers = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if any(
            line.strip().startswith(("import mlflow", "from mlflow"))
            for line in p.read_text().splitlines()
        )
    }
    assert importers == {"tracking/store.py"}
    code = "import sys, moe_impl.tracking; print(any(m.startswith('mlflow') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # lazily, inside functions: importing tracking is cheap


def test_flatten_keeps_values_flatten_config_makes_text():
    nested = {"a": {"b": {"c": 1}, "l": [1, None], "e": {}}, "n": None, "t": (2, 3)}
    flat = {"a.b.c": 1, "a.l": "[1, null]", "a.e": "{}", "n": None, "t": "[2, 3]"}
    assert runinfo.flatten(nested) == flat
    assert runinfo.flatten_config(nested) == {k: str(v) for k, v in flat.items()}
    assert runinfo.flatten({"x": 1}, "p.") == {"p.x": 1}


def test_config_and_record_conversions():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert runinfo.MAX_PARAM_VALUE == MAX_PARAM_VAL_LENGTH
    params = runinfo.flatten_config({"a": {"b": {"c": 1}, "l": [1, None]}, "s": "x" * 7000})
    assert params == {"a.b.c": "1", "a.l": "[1, null]", "s": "x" * 5997 + "..."}
    assert runinfo.record_metrics(
        {"kind": "eval", "split": "test", "step": 3, "nll": 2.0, "excess_nll": None, "time": 1.0}
    ) == {"test/nll": 2.0}
    assert runinfo.flatten_config(_Cfg()) == {"moe.k": "2", "moe.num_experts": "8", "lr": "0.1"}
    summary = {"test_nll": 1.5, "mfu": None, "cv_load": math.nan, "params_total": 7, "other": 1}
    assert runinfo.summary_metrics(summary) == {"test_nll": 1.5, "params_total": 7.0}


@pytest.mark.slow  # `mlflow server` needs ~15 s to come up on 2 cores
def test_mlflow_server_receives_a_run_over_http(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    db = "sqlite:///" + (tmp_path / "server.db").as_posix()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = tracking.start_server(
        "127.0.0.1", port, db, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not come up in 120 s"
                time.sleep(0.5)
        run_dir = write_run_dir(tmp_path / "run")
        tracker = track_live(run_dir, uri, system_metrics_interval_s=None)
        assert tracker.active
        tracker.finish(rundir.read_summary(run_dir))
        identity = json.loads((run_dir / "run.json").read_text())
        (row,) = runs_tagged(uri, identity["run_id"]).to_dict("records")
        assert row["status"] == "FINISHED" and row["metrics.test_perplexity"] == 20.0
        assert row["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server
        assert {"config.yaml", "loss.png"} <= artifact_names(uri, tracker.run_id)

        # the server dies mid-run: one warning, a bounded stall, the run goes on
        second = track_live(write_run_dir(tmp_path / "run2"), uri, system_metrics_interval_s=None)
        assert second.active
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                second.log_metrics({"train/loss": 1.0}, step)
                second.flush()
            second.finish()
        assert not second.active and time.monotonic() - t0 < 30
        assert [w.category for w in caught].count(tracking.TrackingWarning) == 1
    finally:  # the server, its uvicorn worker and its job runner share our session's group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            log.close()
