"""`python -m moe_impl tracking {init,import,sync,ui,screenshot}`: the MLflow store around the run directories.

    python -m moe_impl tracking init                  # create + migrate results/mlflow.db once
    python -m moe_impl tracking import results/runs/*  # load finished run directories, idempotent
    python -m moe_impl tracking sync results/runs/*/*  # ... those tracked, each into its own store
    python -m moe_impl tracking ui --port 5000        # MLflow UI on 127.0.0.1 for the default store
    python -m moe_impl tracking ui --uri sqlite:///new.db --create  # ... of a store made empty
    python -m moe_impl tracking screenshot --out runs.png  # its runs page, from a headless Chromium

The store is MLFLOW_TRACKING_URI, or `--uri`, or sqlite:///<cwd>/results/mlflow.db
(moe_impl/tracking/store.py); `ui` and `screenshot` serve an existing store only (`ui --create`
makes one), on a port nothing listens on yet, and fail (exit 1) when the server stops by itself.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys

from moe_impl import tracking
from moe_impl.tracking import store


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tracking", help="MLflow store: init, import run directories, ui")
    sub = p.add_subparsers(dest="tracking_command", required=True)
    init = sub.add_parser("init", help="create and migrate the store once, before parallel jobs")
    init.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or results/)")
    init.add_argument(
        "--experiment",
        action="append",
        default=[],
        help="an experiment to create as well (repeatable; jobs create theirs when they start)",
    )
    imp = sub.add_parser("import", help="load finished run directories into MLflow")
    imp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    imp.add_argument("--experiment", help="MLflow experiment (default: run.json's experiment)")
    imp.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or results/)")
    sync = sub.add_parser(
        "sync",
        help="import into each store what it lacks of these finished, tracked run directories "
        "(the workflow's step after training); a store that cannot be updated only warns",
    )
    sync.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ui = sub.add_parser("ui", help="start the MLflow UI against the default store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--uri", help="database URI to serve (default: results/mlflow.db)")
    ui.add_argument(
        "--create",
        action="store_true",
        help="create (and migrate) the store when it does not exist, and serve it empty",
    )
    shot = sub.add_parser(
        "screenshot", help="a PNG of an experiment's runs page, from a headless Chromium"
    )
    shot.add_argument("--out", required=True, help="the PNG to write")
    shot.add_argument("--experiment", help="the experiment (default: the store's first of ours)")
    shot.add_argument("--uri", help="database URI to serve (default: results/mlflow.db)")
    shot.add_argument("--port", type=int, default=5077)
    shot.add_argument("--size", default="1600x1000", help="window WIDTHxHEIGHT (default 1600x1000)")
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tracking_command == "init":
        uri = tracking.init_store(args.uri)
        for name in args.experiment:
            tracking.init_store(uri, name)
        made = f" (experiments {', '.join(map(repr, args.experiment))})" if args.experiment else ""
        print(f"MLflow store ready: {uri}{made}")
        return 0
    if args.tracking_command == "import":
        from moe_impl.train.card import ensure_card  # run directories made before cards existed

        for run_dir in args.run_dirs:
            try:
                ensure_card(run_dir)
            except ValueError as err:  # an unreadable config.yaml: imported without a card
                logging.warning("%s: no run card (%s)", run_dir, err)
        ids = tracking.import_runs(args.run_dirs, experiment=args.experiment, tracking_uri=args.uri)
        print(f"{len(ids)} of {len(args.run_dirs)} run directories in MLflow")
        return 0
    if args.tracking_command == "sync":
        for line in tracking.sync_runs(args.run_dirs):
            print(line)
        return 0
    if args.tracking_command == "screenshot":
        return _screenshot(args)
    return _ui(args)


def _ui(args: argparse.Namespace) -> int:
    """Serve the store until Ctrl-C. Its addresses are printed only once the store exists (or
    --create made it) and the port is free: an address must not open another server's store."""
    uri = tracking.resolve_tracking_uri(args.uri or tracking.default_tracking_uri())
    tracking.server_command(args.host, args.port, uri)  # validates before the store is touched
    if not args.create:
        store.require_store(uri, hint=_missing_store_hint(uri))
    store.check_port_free(args.host, args.port)
    tracking.init_store(uri)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri}: {base}", flush=True)
    for name, url in tracking.experiment_urls(uri, base):
        print(f"  {name}: {url}", flush=True)
    print("(ready in about 15 s; Ctrl-C stops it)", flush=True)
    return _serve(tracking.start_server(args.host, args.port, uri), base)


def _missing_store_hint(uri: str) -> str:
    return (
        f"train a run with tracking on, or `python -m moe_impl tracking init --uri {uri}`, to "
        "create one; give --uri for an existing store, or --create to serve an empty one"
    )


def _serve(proc: subprocess.Popen, base: str) -> int:
    """Wait on the server: 0 after Ctrl-C or `kill` of this process (which stops the server too;
    Ctrl-C reaches both already). A server that stops by itself failed (a port taken meanwhile, a
    broken store; `mlflow server` exits 0 even then): 1, after its own log."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)
    print(
        f"error: the MLflow server for {base} stopped by itself (exit code {code}); its log "
        "is above",
        file=sys.stderr,
    )
    return 1


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _screenshot(args: argparse.Namespace) -> int:
    """Serve the store on 127.0.0.1:--port, photograph the experiment's runs page (our saved view,
    tracking/view.py) and stop the server."""
    from moe_impl.tracking import browser

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"--size must be WIDTHxHEIGHT, e.g. 1600x1000; got {args.size!r}"
        ) from None
    uri = tracking.resolve_tracking_uri(args.uri or tracking.default_tracking_uri())
    tracking.server_command("127.0.0.1", args.port, uri)  # validates the port and the URI
    store.require_store(uri, hint="give --uri for the store the runs were logged to")
    store.check_port_free("127.0.0.1", args.port)
    if browser.find_chromium() is None:
        raise ValueError("no Chromium found; on Debian: apt-get install chromium")
    base = f"http://127.0.0.1:{args.port}"
    urls = dict(tracking.experiment_urls(uri, base))
    if not urls:
        raise ValueError(f"{uri} has no experiment of this project's runs")
    name = args.experiment or next(iter(urls))
    if name not in urls:
        raise ValueError(f"--experiment {name!r}: not in {uri}; it has {', '.join(urls)}")
    proc = tracking.start_server(
        "127.0.0.1", args.port, uri, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        browser.wait_until_up(base, proc=proc)
        out = browser.screenshot(urls[name], args.out, window=(width, height))
    except browser.ServerStopped as err:  # a port taken meanwhile, a broken store
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        _stop(proc)
    print(f"{out}: the runs of {name!r} ({urls[name]})")
    return 0
