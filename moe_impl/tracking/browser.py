"""The MLflow UI in a headless Chromium: the page as the browser rendered it (its DOM) or a
screenshot, for the UI test (tests/test_mlflow_ui.py) and `python -m moe_impl tracking screenshot`
(the README's picture of the runs table). No MLflow here: the server is store.py's.

Chromium is found on PATH (`chromium`, Debian's package; `chromium-browser`, `google-chrome`) or
named by $CHROMIUM. It runs with `--virtual-time-budget`, which lets the page's scripts and its
requests to the server finish before the DOM is read or the picture taken, and `--no-sandbox`,
which a root user (a CI container) needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
VIRTUAL_TIME_MS = 20_000
WINDOW = (1600, 1000)


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM, else the first of BROWSERS on PATH, else None."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _run(url: str, mode: list[str], window: tuple[int, int], timeout_s: float) -> bytes:
    browser = find_chromium()
    if browser is None:
        raise ValueError(
            "no Chromium found (chromium, chromium-browser or google-chrome on PATH, or "
            "$CHROMIUM); on Debian: apt-get install chromium"
        )
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={window[0]},{window[1]}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *mode,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{browser} exited with {proc.returncode}: {' / '.join(tail)}")
    return proc.stdout


def render(url: str, window: tuple[int, int] = WINDOW, timeout_s: float = 120) -> str:
    """The page's DOM after its scripts ran (Chromium's --dump-dom)."""
    return _run(url, ["--dump-dom"], window, timeout_s).decode(errors="replace")


def screenshot(
    url: str, out: str | Path, window: tuple[int, int] = WINDOW, timeout_s: float = 120
) -> Path:
    """A PNG of the page as rendered, written to `out`."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={out}"], window, timeout_s)
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {out}")
    return out


class ServerStopped(RuntimeError):
    """The server process being waited for exited before it answered."""


def wait_until_up(
    base_url: str, timeout_s: float = 120, proc: subprocess.Popen | None = None
) -> None:
    """Wait for an MLflow server's /health; TimeoutError after timeout_s. With `proc`, the
    server's process: ServerStopped as soon as it has exited, since a server that failed to
    start (its port taken) leaves the address to whatever else answers there."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and (code := proc.poll()) is not None:
            raise ServerStopped(
                f"the MLflow server for {base_url} stopped by itself (exit code {code}) before "
                "it answered"
            )
        try:
            urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=3).close()
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no MLflow server at {base_url} after {timeout_s:.0f} s"
                ) from None
            time.sleep(0.5)
