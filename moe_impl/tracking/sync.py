"""Run directories to MLflow and back: `import_runs` loads finished run directories (offline or
cluster runs, or a live run whose tracking failed midway), `export_runs` downloads an experiment's
finished runs for `python -m analysis collect --from-mlflow`.

Importing is idempotent: the tag `moe.run_id` (run.json's run_id) identifies a run, so importing
twice never duplicates it, and a partial run gets only the (key, step) points it lacks. Training
steps are imported at the live run's cadence (`train.log_every` of the run's config.yaml and the
last step, runinfo.tracked_step), so a run has one history however it reached MLflow. MLflow itself is
reached through store.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from moe_impl.runs import rundir, runinfo
from moe_impl.tracking import store

log = logging.getLogger(__name__)


# --- import ------------------------------------------------------------------------------------


def import_runs(
    run_dirs: Iterable[str | Path],
    *,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> list[str]:
    """Load finished run directories into MLflow; returns their MLflow run ids.

    A run already complete in the store (tag moe.run_id) is left alone; a partial one (live
    tracking that failed midway) is completed without duplicating its (metric, step) points.
    Unfinished runs (no summary.json) are skipped with a warning. experiment defaults to
    run.json's "experiment".
    """
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not (d / rundir.RUN_FILE).is_file():
            raise ValueError(f"{d}: not a run directory (no {rundir.RUN_FILE})")
    uri = store.resolve_tracking_uri(tracking_uri)
    client = store.open_client(uri)
    ids = []
    for d in dirs:
        if not rundir.is_finished(d):
            log.warning("%s: skipped, the run is unfinished (no %s)", d, rundir.SUMMARY_FILE)
            continue
        ids.append(_import_one(client, uri, d, experiment))
    return ids


def tracked_stores(run_dirs: Iterable[str | Path]) -> dict[str, list[Path]]:
    """{tracking URI: the finished run directories that log to it}: each run's config.yaml says
    whether it is tracked (`tracking.enabled`, default true) and where (`tracking.uri`, resolved
    as the live run resolves it, store.resolve_tracking_uri); untracked and unfinished runs are
    left out."""
    stores: dict[str, list[Path]] = {}
    for d in map(Path, run_dirs):
        if not rundir.is_finished(d) or not (d / rundir.RUN_FILE).is_file():
            continue
        try:
            section = _read_config(d).get("tracking")
        except Exception as err:  # yaml's errors, a config that is not a mapping
            log.warning("%s: skipped, its %s is unreadable (%s)", d, rundir.CONFIG_FILE, err)
            continue
        section = section if isinstance(section, dict) else {}
        if section.get("enabled", True) is False:
            continue
        uri = store.resolve_tracking_uri(section.get("uri"))
        stores.setdefault(uri, []).append(d)
    return stores


def sync_runs(run_dirs: Iterable[str | Path]) -> list[str]:
    """Bring every store up to date with the finished, tracked run directories (tracked_stores):
    what a deleted or emptied store lacks, or a live run that lost its server left out, is
    imported (import_runs: idempotent, so runs already there cost a lookup each). The store is
    a view of the run directories, so a store that cannot be updated is a warning, never an
    error: returns one line per store saying what it now holds, or why it was not updated."""
    lines = []
    for uri, dirs in tracked_stores(run_dirs).items():
        try:
            ids = import_runs(dirs, tracking_uri=uri)
        except Exception as err:  # the mirror failed; nothing is lost (the run dirs hold it)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning(
                "MLflow store %s not brought up to date (%s); its %d runs are safe in their run "
                "directories: `python -m moe_impl tracking import DIR...` loads them later",
                uri,
                first,
                len(dirs),
            )
            lines.append(f"{uri}: not updated ({first})")
            continue
        lines.append(f"{uri}: {len(ids)} of {len(dirs)} tracked run directories in MLflow")
    return lines


FIGURES_PATH = "figures"  # the artifact folder of a run's figures (attach_figures)


def attach_figures(figures: dict[str | Path, list[str | Path]]) -> list[str]:
    """Log each run directory's figures (files) as artifacts of its MLflow run, under
    FIGURES_PATH, so that its run page shows them. A figure logged again replaces the file of
    the same name: a run holds each once, however often the analysis runs. Only tracked runs
    (tracked_stores) whose store exists and holds them; a store that fails is a warning (the
    figures are on disk either way). Returns one line per store."""
    lines = []
    for uri, dirs in tracked_stores(figures).items():
        try:
            store.require_store(uri)  # reading a store must not create one
            client = store.open_client(uri)
            attached = 0
            for run_dir in dirs:
                identity = rundir.read_json(run_dir / rundir.RUN_FILE)
                run = store.find_run(client, str(identity.get("run_id") or ""))
                if run is None:
                    continue
                for path in figures.get(run_dir) or figures.get(str(run_dir)) or []:
                    client.log_artifact(run.info.run_id, str(path), artifact_path=FIGURES_PATH)
                attached += 1
        except Exception as err:  # the figures are written; MLflow is a view of them
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("MLflow store %s: figures not attached (%s)", uri, first)
            lines.append(f"{uri}: figures not attached ({first})")
            continue
        lines.append(f"{uri}: figures attached to {attached} of {len(dirs)} runs")
    return lines


def _read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / rundir.CONFIG_FILE
    if not path.is_file():
        log.warning("%s: no %s, the run gets no params", run_dir, rundir.CONFIG_FILE)
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(config).__name__}")
    return config


def _import_one(client, uri: str, run_dir: Path, experiment: str | None) -> str:
    identity = rundir.read_json(run_dir / rundir.RUN_FILE)
    if not identity.get("run_id"):
        raise ValueError(f"{run_dir / rundir.RUN_FILE}: no run_id")
    run = store.find_run(client, str(identity["run_id"]))
    if run is not None and run.data.tags.get(store.COMPLETE_TAG) == "true":
        log.info("%s: already in MLflow as run %s", run_dir, run.info.run_id)
        return run.info.run_id
    started_ms = _started_ms(run_dir, identity)
    seen: dict[str, set[int]] = {}
    config = _read_config(run_dir)
    card = identity.get(runinfo.CARD_KEY) or {}
    if run is None:
        exp_name = experiment or identity.get("experiment") or store.DEFAULT_EXPERIMENT
        _, experiment_id = store.open_store(uri, str(exp_name))
        tags = {
            **store.identity_tags(identity),
            **runinfo.config_tags(config),
            **store.card_tags(card),
            store.IMPORTED_TAG: "true",
        }
        name = card.get("display_name") or _display_name(identity, config, run_dir)
        run = client.create_run(experiment_id, start_time=started_ms, tags=tags, run_name=name)
        store.mark_replaced(client, run, run_dir)
    else:  # a partial live run: add only the (key, step) points it lacks
        seen = store.metric_steps(client, run)
    run_id = run.info.run_id
    if card.get("dataset"):
        store.log_dataset(client, run_id, card["dataset"])
    if config.get("sweep"):
        store.add_sweep_views(client, run.info.experiment_id, [str(config["sweep"])])
    metrics, end_ms = _metric_points(run_dir, started_ms, seen, _log_every(config))
    params = store.new_params(run, runinfo.flatten_config(config))
    store.log_batch(client, run_id, metrics=metrics, params=params)
    for path in runinfo.run_artifacts(run_dir):
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, store.COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED", end_time=end_ms)
    log.info("%s: imported as MLflow run %s", run_dir, run_id)
    return run_id


def _display_name(identity: dict, config: dict, run_dir: Path) -> str:
    """A run's MLflow name from its run.json and config.yaml (runinfo.display_name), for a run
    directory without a card."""
    train = config.get("train")
    train = train if isinstance(train, dict) else {}
    seed = train.get("seed")
    seed = seed if isinstance(seed, int) else 0
    name = str(identity.get("name") or config.get("name") or run_dir.name)
    return runinfo.display_name(name, config.get("sweep") or None, seed)


def missing_points(run_dir: str | Path, seen: dict[str, set[int]]) -> list:
    """The MLflow metric points of a run directory that a run lacks (`seen`: its steps per key,
    store.metric_steps), at the live cadence: what the live tracker adds when a run finishes,
    for the steps of an earlier segment whose tracking was off or failed."""
    run_dir = Path(run_dir)
    identity = rundir.read_json(run_dir / rundir.RUN_FILE)
    every = _log_every(_read_config(run_dir))
    return _metric_points(run_dir, _started_ms(run_dir, identity), seen, every)[0]


def _started_ms(run_dir: Path, identity: dict) -> int:
    started_ms = runinfo.epoch_ms(identity.get("started"))
    if started_ms is None:
        started_ms = int((run_dir / rundir.RUN_FILE).stat().st_mtime * 1000)
    return started_ms


def _log_every(config: dict) -> int:
    """The run's train.log_every: the live run's cadence; 1 (every step) when config.yaml does not
    say (a run directory written by other code)."""
    train = config.get("train")
    every = train.get("log_every") if isinstance(train, dict) else None
    return every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else 1


def _metric_points(run_dir: Path, started_ms: int, seen: dict[str, set[int]], log_every: int = 1):
    """(MLflow metric points from metrics.jsonl and summary.json minus the `seen` (key, step)
    points, the run's end in epoch ms): training steps at the live run's cadence (runinfo.tracked_step),
    every evaluation, each (key, step) once (the first). A record's "time" is epoch seconds or
    seconds since the start."""
    seen = {key: set(steps) for key, steps in seen.items()}  # grows with the points added
    records = rundir.read_metrics(run_dir)
    summary = rundir.read_summary(run_dir) or {}
    train_steps = [int(r["step"]) for r in records if _is_train(r)]
    last = int(runinfo.number(summary.get("steps")) or max(train_steps, default=0))
    metrics, last_step = [], 0
    for record in records:
        if (step := record.get("step")) is None:
            continue
        last_step = step = int(step)
        if _is_train(record) and not runinfo.tracked_step(step, log_every, last):
            continue
        t = runinfo.number(record.get("time"))
        ts = started_ms if t is None else int(t * 1000) if t > 1e9 else started_ms + int(t * 1000)
        for key, value in runinfo.record_metrics(record).items():
            if step not in seen.setdefault(key, set()):
                seen[key].add(step)
                metrics.append(store.metric(key, value, ts, step))
    wall = runinfo.number(summary.get("wall_time_s"))
    end_ms = started_ms + int(wall * 1000) if wall is not None else started_ms
    step = int(runinfo.number(summary.get("steps")) or last_step)
    for key, value in runinfo.final_metrics(summary).items():
        if step not in seen.get(key, ()):
            metrics.append(store.metric(key, value, end_ms, step))
    return metrics, end_ms


def _is_train(record: dict) -> bool:
    return record.get("kind", "train") == "train" and record.get("step") is not None


# --- export (for analysis) ---------------------------------------------------------------------


def export_runs(
    experiment: str, dest: str | Path, *, tracking_uri: str | None = None
) -> list[dict]:
    """The FINISHED runs of an MLflow experiment, for `python -m analysis collect --from-mlflow`,
    except those another run replaced (tag REPLACED_TAG, store.mark_replaced).

    Each run's artifacts (the run-directory files `finish` and `import_runs` log: config.yaml,
    summary.json, run.json, metrics.jsonl) are downloaded into dest/<mlflow run id>/, so analysis
    reads them exactly as it reads a run directory. Returns one dict per run, in start order:
    {"mlflow_run_id", "run_name", "tags", "params", "metrics" (latest values), "history"
    ({key: [(step, value), ...]} for every metric outside train/ and system/, i.e. the evals),
    "dir" (the download folder, or None where the artifacts could not be fetched)}.
    """
    uri = store.resolve_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    client = store.open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment {experiment!r} does not exist in {uri}")
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    replaced = [r for r in runs if store.REPLACED_TAG in r.data.tags]
    if replaced:  # runs whose run directory was set aside for a changed config
        log.info("skipped %d replaced runs (tag %s)", len(replaced), store.REPLACED_TAG)
    kept = [r for r in runs if store.REPLACED_TAG not in r.data.tags]
    return [_export_one(client, run, Path(dest)) for run in kept]


def _export_one(client, run, dest: Path) -> dict:
    run_id = run.info.run_id
    folder = dest / run_id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        client.download_artifacts(run_id, "", str(folder))
    except Exception as err:  # artifact store unreachable: params and metrics still serve
        log.warning("run %s: artifacts not downloaded (%s)", run_id, err)
        folder = None
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
        if not key.startswith(("train/", "system/"))
    }
    return {
        "mlflow_run_id": run_id,
        "run_name": run.info.run_name,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "history": history,
        "dir": folder,
    }
