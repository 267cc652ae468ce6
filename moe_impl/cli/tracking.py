"""`python -m moe_impl tracking {init,import,ui}`: the MLflow store around the run directories.

    python -m moe_impl tracking init                  # create + migrate results/mlflow.db once
    python -m moe_impl tracking import results/runs/*  # load finished run directories, idempotent
    python -m moe_impl tracking ui --port 5000        # MLflow UI on 127.0.0.1 for the default store

The store is MLFLOW_TRACKING_URI, or `--uri`, or sqlite:///<cwd>/results/mlflow.db
(moe_impl/tracking/store.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess

from moe_impl import tracking


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tracking", help="MLflow store: init, import run directories, ui")
    sub = p.add_subparsers(dest="tracking_command", required=True)
    init = sub.add_parser("init", help="create and migrate the store once, before parallel jobs")
    init.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or results/)")
    init.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    imp = sub.add_parser("import", help="load finished run directories into MLflow")
    imp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    imp.add_argument("--experiment", help="MLflow experiment (default: run.json's experiment)")
    imp.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or results/)")
    ui = sub.add_parser("ui", help="start the MLflow UI against the default store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--uri", help="database URI to serve (default: results/mlflow.db)")
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tracking_command == "init":
        uri = tracking.init_store(args.uri, args.experiment)
        print(f"MLflow store ready: {uri} (experiment {args.experiment!r})")
        return 0
    if args.tracking_command == "import":
        ids = tracking.import_runs(args.run_dirs, experiment=args.experiment, tracking_uri=args.uri)
        print(f"{len(ids)} of {len(args.run_dirs)} run directories in MLflow")
        return 0
    uri = tracking.resolve_tracking_uri(args.uri or tracking.default_tracking_uri())
    tracking.server_command(args.host, args.port, uri)  # validates before the store is touched
    tracking.init_store(uri)
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}", flush=True)
    print("(ready in about 15 s; Ctrl-C stops it)", flush=True)
    proc = tracking.start_server(args.host, args.port, uri)
    # `kill` of this process stops the server too (Ctrl-C reaches both already)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
