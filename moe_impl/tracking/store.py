"""The MLflow store: its URI, opening (creating and migrating) it under a lock, the server, and the
few client calls the live run (live.py) and the importer (sync.py) share.

The only module that imports mlflow, lazily inside functions, so importing moe_impl.tracking is
cheap; live.py and sync.py get the client, the entities and the exceptions through the functions
below.
- `init_store` creates and migrates the store once, before parallel jobs: several processes
  migrating a fresh SQLite file race in Alembic (docs/tracking.md).
- A run in the store is identified by the tag `moe.run_id` (run.json's run_id), so resuming or
  importing a run never duplicates it.
Default store: sqlite:///<cwd>/results/mlflow.db with artifacts in <cwd>/results/mlartifacts/
(absolute URIs, docs/tracking.md); MLFLOW_TRACKING_URI or an explicit URI points elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from moe_impl.runs import rundir
from moe_impl.tracking import view

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "moe"
RUN_ID_TAG = "moe.run_id"  # run.json's run_id: the idempotency key
COMPLETE_TAG = "moe.complete"  # "true" once everything in the run directory is in MLflow
IMPORTED_TAG = "moe.imported"
REPLACED_TAG = "moe.replaced_by"  # the moe.run_id of the run that took this run's name
MLFLOW_RUN_KEY, MLFLOW_URI_KEY = "mlflow_run_id", "mlflow_tracking_uri"  # added to run.json
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


# --- URIs --------------------------------------------------------------------------------------


def results_dir() -> Path:
    return Path("results").resolve()


def default_tracking_uri() -> str:
    return "sqlite:///" + (results_dir() / "mlflow.db").as_posix()  # sqlite:////abs/...


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else the default; relative SQLite paths
    become absolute (jobs may run in another cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r}: expected sqlite:///PATH.db, http(s)://HOST:PORT or a "
            "database URL (the ./mlruns file store is disabled in MLflow 3)"
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


# --- opening the store -------------------------------------------------------------------------


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
    """Exclusive per-host file lock around creating a SQLite store (docs/tracking.md)."""
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


def open_store(uri: str, experiment: str | None = None, runs_view: bool = True):
    """(MlflowClient, experiment id or None); creates and migrates the store, and the
    experiment with an explicit artifact location (docs/tracking.md) and the UI's tags (view.py;
    the saved runs view only with `runs_view`), under the store lock."""
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
            tags = view.experiment_tags(experiment, {}, runs_view=runs_view)
            try:
                return client, client.create_experiment(
                    experiment, artifact_location=location, tags=tags
                )
            except MlflowException:  # created meanwhile by a process on another host
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
            log.info("restored the deleted MLflow experiment %r", experiment)
        tags = view.experiment_tags(experiment, dict(exp.tags), runs_view=runs_view)
        _set_experiment_tags(client, exp.experiment_id, tags)  # a store made before
        return client, exp.experiment_id


def _set_experiment_tags(client, experiment_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)


def open_client(uri: str):
    """The MlflowClient of an existing or new store; an unreachable server is a ValueError (the
    command-line importer and exporter report it as a one-line error)."""
    try:
        client, _ = open_store(uri)
    except ConnectionError as err:
        raise ValueError(str(err)) from err
    return client


def require_store(uri: str, hint: str | None = None) -> None:
    """ValueError unless the SQLite store `uri` names exists (other stores are not checked here):
    a command that only reads or shows must not leave an empty store behind, as opening one
    would. `hint` (what the user can do) replaces the default one."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        hint = hint or "give --uri or set MLFLOW_TRACKING_URI to the store the runs were logged to"
        raise ValueError(f"no MLflow store at {uri} ({path} does not exist); {hint}")


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "_"


def init_store(uri: str | None = None, experiment: str | None = None) -> str:
    """Create and migrate the store once (idempotent) and, when named, create the experiment;
    returns the resolved URI. Run it before parallel jobs share a SQLite store
    (docs/tracking.md); each job creates its experiment when it starts (under the store lock)."""
    uri = resolve_tracking_uri(uri)
    try:
        open_store(uri, experiment)
    except ConnectionError as err:
        raise ValueError(str(err)) from err
    return uri


def experiment_urls(uri: str, base_url: str) -> list[tuple[str, str]]:
    """(name, address) of each live experiment of the store with this project's training runs,
    the address opening it on those runs in our saved view (view.experiment_url). The view is
    added where it is missing (a store made before it) or renewed where older code saved it
    (view.VIEW_VERSION), and each sweep of its runs gets its own view."""
    client = open_client(uri)
    # training runs carry a sweep tag (runinfo.config_tags), the analysis's do not
    training = f"tags.`{RUN_ID_TAG}` LIKE '%' AND tags.sweep LIKE '%'"
    urls = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], training, max_results=5000)
        if view.VIEW_VERSION_TAG not in exp.tags and not runs:
            continue
        _set_experiment_tags(client, exp.experiment_id, view.experiment_tags(exp.name, exp.tags))
        add_sweep_views(client, exp.experiment_id, {r.data.tags["sweep"] for r in runs})
        urls.append((exp.name, view.experiment_url(base_url, exp.experiment_id)))
    return urls


def server_command(host: str = "127.0.0.1", port: int = 5000, uri: str | None = None) -> list[str]:
    """`mlflow server` serving a database store and its artifacts (docs/tracking.md)."""
    uri = resolve_tracking_uri(uri or default_tracking_uri())
    if _is_http(uri):
        raise ValueError(f"--uri {uri} is already a server; open it in a browser")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    if (root := artifact_root(uri)) is not None:
        cmd += ["--artifacts-destination", str(root)]
    return [*cmd, "--host", host, "--port", str(port), "--workers", "1"]


def check_port_free(host: str, port: int) -> None:
    """ValueError unless `host:port` can be listened on now. A server there already (perhaps
    another store's MLflow UI) would answer at the address the UI prints while ours fails to bind.
    Binds as MLflow's server (uvicorn) does: IPv6 where the host has a ':', SO_REUSEADDR (so a
    port in TIME_WAIT after a stopped server counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use (another MLflow UI?); stop what listens there "
                "or give another --port"
            ) from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err})") from None


def start_server(
    host: str = "127.0.0.1", port: int = 5000, uri: str | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Start `server_command` in the background. Its job runner (huey consumers for GenAI jobs,
    ~7 processes of ~200 MB here) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says so."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(server_command(host, port, uri), env=env, **popen_kwargs)


# --- runs in the store (shared by live.py and sync.py) -----------------------------------------


def identity_tags(identity: dict) -> dict[str, str]:
    """run.json's identity as MLflow tags: IDENTITY_TAGS, moe.run_id and MLflow's source and git
    tags."""
    tags = {}
    for key in IDENTITY_TAGS:
        if (value := identity.get(key)) is not None:
            tags[key] = str(value).lower() if isinstance(value, bool) else str(value)
    tags[RUN_ID_TAG] = str(identity["run_id"])
    # the runs table's Source column: what made the run (MLflow's own tags)
    tags["mlflow.source.name"], tags["mlflow.source.type"] = "python -m moe_impl train", "LOCAL"
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    return tags


def add_sweep_views(client, experiment_id: str, sweeps) -> None:
    """Give the experiment the saved view of each sweep it lacks (view.sweep_view_tags)."""
    existing = dict(client.get_experiment(experiment_id).tags)
    for sweep in sorted(set(sweeps)):
        _set_experiment_tags(client, experiment_id, view.sweep_view_tags(sweep, existing))


def card_tags(card: dict) -> dict[str, str]:
    """The MLflow tags of a run's card (moe_impl/train/card.py): its description, as the run's
    note."""
    return {view.NOTE_TAG: card["description"]} if card.get("description") else {}


def find_run(client, moe_run_id: str):
    """The store's run tagged with this moe.run_id (a complete one first), or None."""
    if not re.fullmatch(r"[\w.-]+", moe_run_id):
        raise ValueError(f"run.json: run_id {moe_run_id!r} is not a plain identifier")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, f"tags.`{RUN_ID_TAG}` = '{moe_run_id}'")
    runs = sorted(runs, key=lambda r: r.data.tags.get(COMPLETE_TAG) != "true")
    return runs[0] if runs else None


def get_run(client, mlflow_run_id: str):
    """The run with this MLflow run id, or None where the store does not have it."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        return client.get_run(mlflow_run_id)
    return None


def metric_steps(client, run) -> dict[str, set[int]]:
    """{metric key: the steps it has points at} of a run, read once (a request per key); the
    system metrics (system/..., MLflow's own monitor) are left out."""
    run_id = run.info.run_id
    return {
        key: {m.step for m in client.get_metric_history(run_id, key)}
        for key in run.data.metrics
        if not key.startswith("system/")
    }


def metric(key: str, value: float, timestamp_ms: int, step: int):
    """One MLflow metric point (mlflow.entities.Metric), for `log_batch`."""
    from mlflow.entities import Metric

    return Metric(key, value, timestamp_ms, step)


def log_batch(client, run_id: str, metrics=(), params: dict | None = None, tags=None) -> None:
    """Log params, tags and metric points in batches of MLflow's limits, synchronously."""
    from mlflow.entities import Param, RunTag

    param_list = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(param_list), BATCH_PARAMS):
        client.log_batch(run_id, params=param_list[i : i + BATCH_PARAMS], synchronous=True)
    for i in range(0, len(tags), BATCH_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + BATCH_PARAMS], synchronous=True)
    metrics = list(metrics)
    for i in range(0, len(metrics), BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS], synchronous=True)


def new_params(run, params: dict[str, str]) -> dict[str, str]:
    """Params not yet in the run. MLflow params are immutable; changed ones are kept as first
    logged (with a warning), config.yaml has the current values. Changed means another value,
    not other text (same_param_value)."""
    old = run.data.params if run is not None else {}
    changed = sorted(k for k in params if k in old and not same_param_value(old[k], params[k]))
    if changed:
        log.warning("MLflow params keep their first values, config changed for %s", changed[:5])
    return {k: v for k, v in params.items() if k not in old}


def same_param_value(a: str, b: str) -> bool:
    """Whether two param texts hold the same value: a resumed run's config (read back from
    config.yaml) may write a value otherwise than the run's first start did ("1" for "1.0")."""
    return a == b or _param_value(a) == _param_value(b)


def _param_value(text: str):
    """A param's text as a value to compare: read as YAML (JSON lists and dicts included)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _comparable(value)


def _comparable(value):
    """Rules: numbers compare as numbers (1 == 1.0; ints exactly, not through float); "None"
    (Python's text of None) is null; text a float reads ("1e-05", which YAML 1.1 leaves as
    text) is that number; bools stay apart from 0 and 1; lists and dicts element by element."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, str):
        if value == "None":
            return None
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def start_system_metrics(run_id: str, interval_s: float, tracking_uri: str):
    """MLflow's system-metrics monitor (CPU, memory, GPU) for the run, started; resumes logging
    where a resumed run left off."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, interval_s, resume_logging=True, tracking_uri=tracking_uri
    )
    monitor.start()
    return monitor


def log_dataset(client, run_id: str, dataset: dict, context: str = "training") -> None:
    """The run's corpus as an MLflow dataset input (moe_impl/train/card.py, `corpus_dataset`);
    logging the same dataset again adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = Dataset(
        name=dataset["name"],
        digest=dataset["digest"],
        source_type=dataset["source_type"],
        source=dataset["source"],
        profile=dataset.get("profile"),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])


def mark_replaced(client, run, run_dir) -> list[str]:
    """The MLflow runs of the run directories set aside in place of `run_dir` (its config changed,
    docs/workflow.md; rundir.set_aside_copies), renamed `<name> (replaced <date>)` and tagged
    REPLACED_TAG with the run that replaced them (`run`), so that the name is the new run's and
    `export_runs` reads each run once. Each found by the MLflow run id or the moe.run_id its
    run.json holds; one already tagged is left alone. Returns the ids of the runs marked."""
    marked = []
    for old_dir in rundir.set_aside_copies(run_dir):
        path = old_dir / rundir.RUN_FILE
        identity = rundir.read_json(path) if path.is_file() else {}
        old = get_run(client, identity[MLFLOW_RUN_KEY]) if identity.get(MLFLOW_RUN_KEY) else None
        if old is None and identity.get("run_id"):
            old = find_run(client, str(identity["run_id"]))
        if old is None or old.info.run_id == run.info.run_id or REPLACED_TAG in old.data.tags:
            continue
        day = time.strftime("%Y-%m-%d", time.gmtime(old.info.start_time / 1000))
        client.update_run(old.info.run_id, name=f"{old.info.run_name} (replaced {day})")
        client.set_tag(old.info.run_id, REPLACED_TAG, run.data.tags.get(RUN_ID_TAG, ""))
        marked.append(old.info.run_id)
    return marked
