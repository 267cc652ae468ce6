"""MLflow around the run directories: the store (store.py), the live run (live.py), import and
export of run directories (sync.py).

The run directory (moe_impl.runs) is the source of truth; MLflow is for browsing and comparing.
Only store.py imports mlflow, lazily inside functions, so importing this package is cheap.
"""

from moe_impl.tracking.live import RunTracker, TrackingWarning
from moe_impl.tracking.store import (
    COMPLETE_TAG,
    DEFAULT_EXPERIMENT,
    IMPORTED_TAG,
    MLFLOW_RUN_KEY,
    REPLACED_TAG,
    RUN_ID_TAG,
    artifact_root,
    default_tracking_uri,
    experiment_urls,
    init_store,
    resolve_tracking_uri,
    server_command,
    start_server,
)
from moe_impl.tracking.sync import attach_figures, export_runs, import_runs, sync_runs

__all__ = [
    "COMPLETE_TAG",
    "DEFAULT_EXPERIMENT",
    "IMPORTED_TAG",
    "MLFLOW_RUN_KEY",
    "REPLACED_TAG",
    "RUN_ID_TAG",
    "RunTracker",
    "TrackingWarning",
    "artifact_root",
    "attach_figures",
    "default_tracking_uri",
    "experiment_urls",
    "export_runs",
    "import_runs",
    "init_store",
    "resolve_tracking_uri",
    "server_command",
    "start_server",
    "sync_runs",
]
