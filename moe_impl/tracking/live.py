"""The live run: one MLflow run per training job, logged as the job writes its run directory.

A store that is unreachable or fails warns once and turns the tracker into a no-op: tracking never
stops a run, and `python -m moe_impl tracking import` (sync.py) loads the run directory later.
Metric names are those of the importer (runinfo.record_metrics), so a run finished here is
complete and a later import leaves it alone. MLflow itself is reached through store.py.

Exactly once per step: a training step's metrics go to MLflow every `train.log_every` steps and at
the last step (runinfo.tracked_step, the importer's rule too), and a resumed run skips the points MLflow
already has (MLflow cannot replace a point: logging a (key, step) again adds a second one), so a
run killed and resumed, or resumed after it finished, has one point per key and step
(docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from moe_impl.runs import rundir, runinfo
from moe_impl.tracking import store, sync

log = logging.getLogger(__name__)

FLUSH_EVERY_S, FLUSH_EVERY_N = 5.0, 500


class TrackingWarning(RuntimeWarning):
    """Tracking is off for this run; the run directory still has everything."""


class RunTracker:
    """Logs one job to MLflow as it runs; a no-op (`active` False) when the store fails.

    Pass every record appended to metrics.jsonl to `log_record` (same names as `import_runs`):
    a run finished here is tagged complete and a later import leaves it alone. Usable as a
    context manager: an exception marks the run FAILED (KILLED on Ctrl-C), a normal exit
    finishes it with the run directory's summary.json. Call it on rank 0 only.
    """

    def __init__(self, run_dir: str | Path, tracking_uri: str | None = None):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None  # the MLflow run id
        self._client = None
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._last_step = 0
        # a resumed run: per metric key, the last step MLflow had; points up to it are not logged
        # again (a resumed run trains the steps after its checkpoint again, with the same values)
        self._logged: dict[str, int] = {}
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
        runs_view: bool = True,
    ) -> RunTracker:
        """Start (or, when run.json names a run in this store, resume) the job's MLflow run.

        Never raises because of the store. Creates run.json (runinfo.write_run_identity) when
        the caller has not. system_metrics_interval_s=None turns MLflow's system metrics off;
        runs_view=False leaves the experiment without the saved runs view (view.py), for an
        experiment that holds no training runs.
        """
        tracker = cls(run_dir, tracking_uri)
        # the run directory and the config are not the store: their errors do raise
        identity = runinfo.write_run_identity(run_dir, run_name, experiment)
        params = runinfo.flatten_config(config)
        try:
            tracker.tracking_uri = store.resolve_tracking_uri(tracking_uri)
            tracker._start(identity, params, experiment, run_name, tags or {}, runs_view)
            if system_metrics_interval_s:
                tracker._start_monitor(system_metrics_interval_s)
        except Exception as err:  # store unreachable, locked, misconfigured...: never the run
            tracker._disable(err)
        return tracker

    def _start(
        self, identity: dict, params: dict, experiment, run_name, tags: dict, runs_view: bool
    ) -> None:
        assert self.tracking_uri is not None  # start() resolved it
        client, experiment_id = store.open_store(self.tracking_uri, experiment, runs_view)
        run = None
        if identity.get(store.MLFLOW_URI_KEY) == self.tracking_uri and identity.get(
            store.MLFLOW_RUN_KEY
        ):
            run = store.get_run(client, identity[store.MLFLOW_RUN_KEY])
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        run = run or store.find_run(client, identity["run_id"])
        git = {} if "git_commit" in identity else runinfo.git_info()
        card = identity.get(runinfo.CARD_KEY) or {}
        run_name = card.get("display_name") or run_name
        all_tags = {
            **store.identity_tags({**git, **identity}),
            "host": runinfo.host(),
            **runinfo.versions(),
            "experiment": experiment,
            **{k: str(v) for k, v in tags.items()},
            **store.card_tags(card),
        }
        all_tags.setdefault("device_name", runinfo.device_name())
        if run is None:
            run = client.create_run(
                experiment_id,
                start_time=runinfo.epoch_ms(identity.get("started")),
                tags=all_tags,
                run_name=run_name,
            )
            store.log_batch(client, run.info.run_id, params=params)
            store.mark_replaced(client, run, self.run_dir)
        else:  # resume
            self._logged = {k: max(s) for k, s in store.metric_steps(client, run).items() if s}
            client.update_run(run.info.run_id, status="RUNNING", name=run_name)
            store.log_batch(
                client, run.info.run_id, params=store.new_params(run, params), tags=all_tags
            )
        if card.get("dataset"):
            store.log_dataset(client, run.info.run_id, card["dataset"])
        if runs_view and all_tags.get("sweep"):
            store.add_sweep_views(client, run.info.experiment_id, [all_tags["sweep"]])
        self._client, self.run_id = client, run.info.run_id
        identity = {
            **identity,
            store.MLFLOW_RUN_KEY: self.run_id,
            store.MLFLOW_URI_KEY: self.tracking_uri,
        }
        rundir.write_json(self.run_dir / rundir.RUN_FILE, identity)

    def _start_monitor(self, interval_s: float) -> None:
        try:
            assert self.run_id is not None and self.tracking_uri is not None  # after _start
            self._monitor = store.start_system_metrics(self.run_id, interval_s, self.tracking_uri)
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
        """Buffer per-step metrics (None/NaN/inf skipped, and, resumed, the keys MLflow already
        has at this step or later); flushed every few seconds or records."""
        if not self.active:
            return
        now_ms, step = int(time.time() * 1000), int(step)
        self._last_step = step
        for key, value in metrics.items():
            key = runinfo.metric_key(key)
            if step <= self._logged.get(key, -1):
                continue
            if (v := runinfo.number(value)) is not None:
                self._buffer.append(store.metric(key, v, now_ms, step))
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
            # run_id is set whenever _call runs fn (a client, once started)
            self._call(lambda c: store.log_batch(c, self.run_id, metrics=buffer))  # type: ignore[arg-type]

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Copy files (or folders) into the run's artifacts; missing paths are skipped."""
        for path in map(Path, paths):
            if path.is_dir():
                self._call(lambda c, p=path: c.log_artifacts(self.run_id, str(p), p.name))
            elif path.is_file():
                self._call(lambda c, p=path: c.log_artifact(self.run_id, str(p), artifact_path))

    def finish(self, summary: dict | None = None, status: str = "FINISHED") -> None:
        """Log summary.json's final metrics (runinfo.final_metrics), the run files as artifacts, close."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._closed:
            return
        if summary is None:
            summary = rundir.read_summary(self.run_dir) or {}
        self.flush()
        step = int(runinfo.number(summary.get("steps")) or self._last_step)
        self.log_metrics(runinfo.final_metrics(summary), step)
        self.flush()
        if status == "FINISHED" and rundir.is_finished(self.run_dir):
            self._call(self._fill_gaps)
        self.log_artifacts(runinfo.run_artifacts(self.run_dir))
        self._stop_monitor()
        if status == "FINISHED":
            self._call(lambda c: c.set_tag(self.run_id, store.COMPLETE_TAG, "true"))
        self._call(lambda c: c.set_terminated(self.run_id, status))
        self._closed = True

    def _fill_gaps(self, client) -> None:
        """Before the run is tagged complete: log what the run directory has and MLflow lacks,
        the steps of an earlier segment whose tracking was off or could not reach the store (a
        later `tracking import` leaves a complete run alone)."""
        assert self.run_id is not None  # _call runs it once started
        run = store.get_run(client, self.run_id)
        points = sync.missing_points(self.run_dir, store.metric_steps(client, run))
        store.log_batch(client, self.run_id, metrics=points)

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
