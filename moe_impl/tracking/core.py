"""MLflow tracking: one MLflow run per job, fed from the run directory (rundir.py).

The only module that imports mlflow, lazily inside functions, so `import moe_impl.tracking.core` is
cheap. The run directory stays the source of truth; MLflow is for browsing and comparing.
- `init_store` creates and migrates the store once, before parallel jobs: several processes
  migrating a fresh SQLite file race in Alembic (stack.md §2.5).
- `RunTracker` logs a job live. A store that is unreachable or fails warns once and turns the
  tracker into a no-op: tracking never stops a run.
- `import_runs` loads finished run directories later (offline or cluster runs). The tag
  `moe.run_id` (run.json's run_id) identifies a run, so importing twice never duplicates it.
Default store: sqlite:///<cwd>/results/mlflow.db with artifacts in <cwd>/results/mlartifacts/
(absolute URIs, stack.md §2.1); MLFLOW_TRACKING_URI or an explicit URI points elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from pathlib import Path

from moe_impl.runs import rundir, runinfo

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "moe"
RUN_ID_TAG = "moe.run_id"  # run.json's run_id: the idempotency key
COMPLETE_TAG = "moe.complete"  # "true" once everything in the run directory is in MLflow
IMPORTED_TAG = "moe.imported"
MLFLOW_RUN_KEY, MLFLOW_URI_KEY = "mlflow_run_id", "mlflow_tracking_uri"  # added to run.json
FLUSH_EVERY_S, FLUSH_EVERY_N = 5.0, 500
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # log_batch limits
HTTP_PROBE_TIMEOUT_S = 3.0
# NOTE: MLflow's HTTP client retries 7 times with exponential backoff (~4 min) by default; a
# training loop should not stall that long on a dead server. Applied only where unset.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
IDENTITY_TAGS = ("experiment", "host", "git_commit", "git_dirty", "torch_version", "sweep")


class TrackingWarning(RuntimeWarning):
    """Tracking is off for this run; the run directory still has everything."""


# --- store -------------------------------------------------------------------------------------


def results_dir() -> Path:
    return Path("results").resolve()


def default_tracking_uri() -> str:
    return "sqlite:///" + (results_dir() / "mlflow.db").as_posix()  # sqlite:////abs/...


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else the default; relative SQLite paths
    become absolute (jobs may run in another cwd, stack.md §2.1)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r}: expected sqlite:///PATH.db, http(s)://HOST:PORT or a "
            "database URL (the ./mlruns file store is disabled in MLflow 3, stack.md §2.1)"
        )
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = "sqlite:///" + path.resolve().as_posix()
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


def artifact_root(uri: str) -> Path | None:
    """mlartifacts/ beside a SQLite file; None for servers (they choose) and other databases."""
    path = _sqlite_path(uri)
    return None if path is None else path.parent / "mlartifacts"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _probe(uri: str) -> None:
    """ConnectionError unless an HTTP store answers; cheaper than MLflow's minutes of retries."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HTTP_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # something answered (an auth proxy, an older server without /health)
    except (OSError, ValueError) as err:
        raise ConnectionError(f"tracking server {uri} is unreachable ({err})") from err


@contextlib.contextmanager
def _store_lock(uri: str):
    """Exclusive per-host file lock around creating a SQLite store (stack.md §2.5)."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open(uri: str, experiment: str | None = None):
    """(MlflowClient, experiment id or None); creates and migrates the store, and the
    experiment with an explicit artifact location (stack.md §2.1), under the store lock."""
    if _is_http(uri):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        _probe(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # builds (and for a new file, migrates) the store
        if experiment is None:
            return client, None
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            root = artifact_root(uri)
            location = None if root is None else (root / _safe(experiment)).as_uri()
            try:
                return client, client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by a process on another host
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
            log.info("restored the deleted MLflow experiment %r", experiment)
        return client, exp.experiment_id


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "_"


def init_store(uri: str | None = None, experiment: str | None = None) -> str:
    """Create and migrate the store once (idempotent) and create the experiment; returns the
    resolved URI. Run it before parallel jobs share a SQLite store (stack.md §2.5)."""
    uri = resolve_tracking_uri(uri)
    try:
        _open(uri, experiment or DEFAULT_EXPERIMENT)
    except ConnectionError as err:
        raise ValueError(str(err)) from err
    return uri


def server_command(host: str = "127.0.0.1", port: int = 5000, uri: str | None = None) -> list[str]:
    """`mlflow server` serving a database store and its artifacts (stack.md §2.4)."""
    uri = resolve_tracking_uri(uri or default_tracking_uri())
    if _is_http(uri):
        raise ValueError(f"--uri {uri} is already a server; open it in a browser")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    if (root := artifact_root(uri)) is not None:
        cmd += ["--artifacts-destination", str(root)]
    return [*cmd, "--host", host, "--port", str(port), "--workers", "1"]


def start_server(
    host: str = "127.0.0.1", port: int = 5000, uri: str | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Start `server_command` in the background. Its job runner (huey consumers for GenAI jobs,
    ~7 processes of ~200 MB here) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says so."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(server_command(host, port, uri), env=env, **popen_kwargs)


def _identity_tags(identity: dict) -> dict[str, str]:
    tags = {}
    for key in IDENTITY_TAGS:
        if (value := identity.get(key)) is not None:
            tags[key] = str(value).lower() if isinstance(value, bool) else str(value)
    tags[RUN_ID_TAG] = str(identity["run_id"])
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    return tags


def _find_run(client, moe_run_id: str):
    """The store's run tagged with this moe.run_id (a complete one first), or None."""
    if not re.fullmatch(r"[\w.-]+", moe_run_id):
        raise ValueError(f"run.json: run_id {moe_run_id!r} is not a plain identifier")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, f"tags.`{RUN_ID_TAG}` = '{moe_run_id}'")
    runs = sorted(runs, key=lambda r: r.data.tags.get(COMPLETE_TAG) != "true")
    return runs[0] if runs else None


def _log_batch(client, run_id: str, metrics=(), params: dict | None = None, tags=None) -> None:
    from mlflow.entities import Param, RunTag

    params = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(params), BATCH_PARAMS):
        client.log_batch(run_id, params=params[i : i + BATCH_PARAMS], synchronous=True)
    for i in range(0, len(tags), BATCH_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + BATCH_PARAMS], synchronous=True)
    metrics = list(metrics)
    for i in range(0, len(metrics), BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS], synchronous=True)


def _new_params(run, params: dict[str, str]) -> dict[str, str]:
    """Params not yet in the run. MLflow params are immutable; changed ones are kept as first
    logged (with a warning), config.yaml has the current values."""
    old = run.data.params if run is not None else {}
    changed = sorted(k for k in params if k in old and old[k] != params[k])
    if changed:
        log.warning("MLflow params keep their first values, config changed for %s", changed[:5])
    return {k: v for k, v in params.items() if k not in old}


# --- live tracking -----------------------------------------------------------------------------


class RunTracker:
    """Logs one job to MLflow as it runs; a no-op (`active` False) when the store fails.

    Pass every record appended to metrics.jsonl to `log_record` (same names as `import_runs`):
    a run finished here is tagged complete and a later import leaves it alone. Usable as a
    context manager: an exception marks the run FAILED (KILLED on Ctrl-C), a normal exit
    finishes it with the run directory's summary.json. Call it on rank 0 only (stack.md §1.7).
    """

    def __init__(self, run_dir: str | Path, tracking_uri: str | None = None):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None  # the MLflow run id
        self._client = None
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._last_step = 0
        self._warned = self._closed = False
        self._monitor = None

    @property
    def active(self) -> bool:
        return self._client is not None and not self._closed

    @classmethod
    def start(
        cls,
        run_dir: str | Path,
        *,
        config: dict,
        experiment: str,
        run_name: str,
        tags: dict | None = None,
        tracking_uri: str | None = None,
        system_metrics_interval_s: float | None = 10.0,
    ) -> RunTracker:
        """Start (or, when run.json names a run in this store, resume) the job's MLflow run.

        Never raises because of the store. Creates run.json (runinfo.write_run_identity) when
        the caller has not. system_metrics_interval_s=None turns MLflow's system metrics off.
        """
        tracker = cls(run_dir, tracking_uri)
        # the run directory and the config are not the store: their errors do raise
        identity = runinfo.write_run_identity(run_dir, run_name, experiment)
        params = runinfo.flatten_config(config)
        try:
            tracker.tracking_uri = resolve_tracking_uri(tracking_uri)
            tracker._start(identity, params, experiment, run_name, tags or {})
            if system_metrics_interval_s:
                tracker._start_monitor(system_metrics_interval_s)
        except Exception as err:  # store unreachable, locked, misconfigured...: never the run
            tracker._disable(err)
        return tracker

    def _start(self, identity: dict, params: dict, experiment, run_name, tags: dict) -> None:
        from mlflow.exceptions import MlflowException

        client, experiment_id = _open(self.tracking_uri, experiment)
        run = None
        if identity.get(MLFLOW_URI_KEY) == self.tracking_uri and identity.get(MLFLOW_RUN_KEY):
            with contextlib.suppress(MlflowException):
                run = client.get_run(identity[MLFLOW_RUN_KEY])
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        run = run or _find_run(client, identity["run_id"])
        git = {} if "git_commit" in identity else runinfo.git_info()
        all_tags = {
            **_identity_tags({**git, **identity}),
            "host": runinfo.host(),
            **runinfo.versions(),
            "experiment": experiment,
            **{k: str(v) for k, v in tags.items()},
        }
        all_tags.setdefault("device_name", runinfo.device_name())
        if run is None:
            run = client.create_run(
                experiment_id,
                start_time=runinfo.epoch_ms(identity.get("started")),
                tags=all_tags,
                run_name=run_name,
            )
            _log_batch(client, run.info.run_id, params=params)
        else:  # resume
            client.update_run(run.info.run_id, status="RUNNING")
            _log_batch(client, run.info.run_id, params=_new_params(run, params), tags=all_tags)
        self._client, self.run_id = client, run.info.run_id
        identity = {**identity, MLFLOW_RUN_KEY: self.run_id, MLFLOW_URI_KEY: self.tracking_uri}
        rundir.write_json(self.run_dir / rundir.RUN_FILE, identity)

    def _start_monitor(self, interval_s: float) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, interval_s, resume_logging=True, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as err:  # psutil missing, ...: system metrics are optional
            log.debug("MLflow system metrics off: %s", err)
            self._monitor = None

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()

    def _disable(self, err: BaseException) -> None:
        """Warn once (one line) and stop talking to the store."""
        if not self._warned:
            self._warned = True
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            warnings.warn(
                f"MLflow tracking off for {self.run_dir} ({self.tracking_uri}): {reason}. The run "
                f"directory keeps everything; load it later with "
                f"`python -m moe_impl tracking import {self.run_dir}`",
                TrackingWarning,
                stacklevel=3,
            )
        self._client, self._buffer = None, []
        self._stop_monitor()

    def _call(self, fn) -> None:
        """fn(client) against the store; any failure turns tracking off (warned once)."""
        if not self.active:
            return
        try:
            fn(self._client)
        except Exception as err:
            self._disable(err)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Buffer per-step metrics (None/NaN/inf skipped); flushed every few seconds or records."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now_ms, step = int(time.time() * 1000), int(step)
        self._last_step = step
        for key, value in metrics.items():
            if (v := runinfo.number(value)) is not None:
                self._buffer.append(Metric(runinfo.metric_key(key), v, now_ms, step))
        if (
            len(self._buffer) >= FLUSH_EVERY_N
            or time.monotonic() - self._last_flush >= FLUSH_EVERY_S
        ):
            self.flush()

    def log_record(self, record: dict) -> None:
        """Log one metrics.jsonl record under the names `import_runs` uses (record_metrics)."""
        self.log_metrics(runinfo.record_metrics(record), record.get("step", self._last_step))

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if buffer:
            self._call(lambda c: _log_batch(c, self.run_id, metrics=buffer))

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Copy files (or folders) into the run's artifacts; missing paths are skipped."""
        for path in map(Path, paths):
            if path.is_dir():
                self._call(lambda c, p=path: c.log_artifacts(self.run_id, str(p), p.name))
            elif path.is_file():
                self._call(lambda c, p=path: c.log_artifact(self.run_id, str(p), artifact_path))

    def finish(self, summary: dict | None = None, status: str = "FINISHED") -> None:
        """Log summary.json's SUMMARY_KEYS as final metrics, the run files as artifacts, close."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._closed:
            return
        if summary is None:
            summary = rundir.read_summary(self.run_dir) or {}
        self.flush()
        step = int(runinfo.number(summary.get("steps")) or self._last_step)
        self.log_metrics(runinfo.summary_metrics(summary), step)
        self.flush()
        self.log_artifacts(runinfo.run_artifacts(self.run_dir))
        self._stop_monitor()
        if status == "FINISHED":
            self._call(lambda c: c.set_tag(self.run_id, COMPLETE_TAG, "true"))
        self._call(lambda c: c.set_terminated(self.run_id, status))
        self._closed = True

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED), keeping the config and metrics logged so far."""
        if status not in ("FAILED", "KILLED"):
            raise ValueError(f"status must be FAILED or KILLED, got {status!r}")
        if self._closed:
            return
        self.flush()
        self.log_artifacts(runinfo.run_artifacts(self.run_dir))
        self._stop_monitor()
        self._call(lambda c: c.set_terminated(self.run_id, status))
        self._closed = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.fail("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


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
    uri = resolve_tracking_uri(tracking_uri)
    try:
        client, _ = _open(uri)
    except ConnectionError as err:
        raise ValueError(str(err)) from err
    ids = []
    for d in dirs:
        if not rundir.is_finished(d):
            log.warning("%s: skipped, the run is unfinished (no %s)", d, rundir.SUMMARY_FILE)
            continue
        ids.append(_import_one(client, uri, d, experiment))
    return ids


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
    run = _find_run(client, str(identity["run_id"]))
    if run is not None and run.data.tags.get(COMPLETE_TAG) == "true":
        log.info("%s: already in MLflow as run %s", run_dir, run.info.run_id)
        return run.info.run_id
    started_ms = runinfo.epoch_ms(identity.get("started"))
    if started_ms is None:
        started_ms = int((run_dir / rundir.RUN_FILE).stat().st_mtime * 1000)
    seen: dict[str, set[int]] = {}
    if run is None:
        exp_name = experiment or identity.get("experiment") or DEFAULT_EXPERIMENT
        _, experiment_id = _open(uri, str(exp_name))
        tags = {**_identity_tags(identity), IMPORTED_TAG: "true"}
        name = str(identity.get("name") or run_dir.name)
        run = client.create_run(experiment_id, start_time=started_ms, tags=tags, run_name=name)
    else:  # a partial live run: add only the (key, step) points it lacks
        for key in run.data.metrics:
            seen[key] = {m.step for m in client.get_metric_history(run.info.run_id, key)}
    run_id = run.info.run_id
    metrics, end_ms = _metric_points(run_dir, started_ms, seen)
    params = _new_params(run, runinfo.flatten_config(_read_config(run_dir)))
    _log_batch(client, run_id, metrics=metrics, params=params)
    for path in runinfo.run_artifacts(run_dir):
        client.log_artifact(run_id, str(path))
    client.set_tag(run_id, COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED", end_time=end_ms)
    log.info("%s: imported as MLflow run %s", run_dir, run_id)
    return run_id


def _metric_points(run_dir: Path, started_ms: int, seen: dict[str, set[int]]):
    """(MLflow Metrics from metrics.jsonl and summary.json minus the `seen` (key, step) points,
    the run's end in epoch ms). A record's "time" is epoch seconds or seconds since the start."""
    from mlflow.entities import Metric

    metrics, last_step = [], 0
    for record in rundir.read_metrics(run_dir):
        if (step := record.get("step")) is None:
            continue
        last_step = step = int(step)
        t = runinfo.number(record.get("time"))
        ts = started_ms if t is None else int(t * 1000) if t > 1e9 else started_ms + int(t * 1000)
        for key, value in runinfo.record_metrics(record).items():
            if step not in seen.get(key, ()):
                metrics.append(Metric(key, value, ts, step))
    summary = rundir.read_summary(run_dir) or {}
    wall = runinfo.number(summary.get("wall_time_s"))
    end_ms = started_ms + int(wall * 1000) if wall is not None else started_ms
    step = int(runinfo.number(summary.get("steps")) or last_step)
    for key, value in runinfo.summary_metrics(summary).items():
        if step not in seen.get(key, ()):
            metrics.append(Metric(key, value, end_ms, step))
    return metrics, end_ms


# --- export (for analysis) ---------------------------------------------------------------------


def export_runs(
    experiment: str, dest: str | Path, *, tracking_uri: str | None = None
) -> list[dict]:
    """The FINISHED runs of an MLflow experiment, for `python -m analysis collect --from-mlflow`.

    Each run's artifacts (the run-directory files `finish` and `import_runs` log: config.yaml,
    summary.json, run.json, metrics.jsonl) are downloaded into dest/<mlflow run id>/, so analysis
    reads them exactly as it reads a run directory. Returns one dict per run, in start order:
    {"mlflow_run_id", "run_name", "tags", "params", "metrics" (latest values), "history"
    ({key: [(step, value), ...]} for every metric outside train/ and system/, i.e. the evals),
    "dir" (the download folder, or None where the artifacts could not be fetched)}.
    """
    uri = resolve_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run
    try:
        client, _ = _open(uri)
    except ConnectionError as err:
        raise ValueError(str(err)) from err
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
    out = []
    for run in runs:
        run_id = run.info.run_id
        folder = Path(dest) / run_id
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
        out.append(
            {
                "mlflow_run_id": run_id,
                "run_name": run.info.run_name,
                "tags": dict(run.data.tags),
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "history": history,
                "dir": folder,
            }
        )
    return out
