"""MLflow around the run directories: the store, the live run, import and export.

The run directory (moe_impl.runs) is the source of truth; MLflow is for browsing and comparing.
mlflow is imported lazily, inside functions, so importing this package is cheap.
"""

from moe_impl.tracking.core import (
    COMPLETE_TAG,
    DEFAULT_EXPERIMENT,
    IMPORTED_TAG,
    MLFLOW_RUN_KEY,
    RUN_ID_TAG,
    RunTracker,
    TrackingWarning,
    artifact_root,
    default_tracking_uri,
    export_runs,
    import_runs,
    init_store,
    resolve_tracking_uri,
    server_command,
    start_server,
)

__all__ = [
    "COMPLETE_TAG",
    "DEFAULT_EXPERIMENT",
    "IMPORTED_TAG",
    "MLFLOW_RUN_KEY",
    "RUN_ID_TAG",
    "RunTracker",
    "TrackingWarning",
    "artifact_root",
    "default_tracking_uri",
    "export_runs",
    "import_runs",
    "init_store",
    "resolve_tracking_uri",
    "server_command",
    "start_server",
]
