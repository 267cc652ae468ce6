"""The MLflow UI in a real browser: the smoke workflow's training runs (two sweeps, a model with two
seeds) in a real store, `python -m moe_impl tracking ui` serving it, and headless Chromium
rendering the address that command prints. From the rendered page: it opens on the training runs
(not MLflow's GenAI overview), every run name appears once, and `test_perplexity` is a column; a
sweep's own saved view shows that sweep's runs alone.

Integration tier (about a minute and a half on 2 cores, most of it the training jobs). Skipped, with
the reason, where no Chromium is installed (Debian: `apt-get install chromium`), except where
MOE_REQUIRE_BROWSER is set: .ci/run installs Chromium and sets it, so there the test runs or fails.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SNAKEMAKE, free_port, snakemake, workdir

from moe_impl import cli
from moe_impl.runs import rundir
from moe_impl.tracking import browser

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake (the `workflow` extra) missing"),
    pytest.mark.skipif(
        browser.find_chromium() is None and not os.environ.get("MOE_REQUIRE_BROWSER"),
        reason="no Chromium (Debian: apt-get install chromium; .ci/run installs it)",
    ),
]

SWEEPS = "sweeps_to_run=[lm1b,news100b]"
# a run-name cell of the runs table: a link to the run's page around the name
RUN_LINK = re.compile(r'href="#/experiments/\d+/runs/[0-9a-f]{32}"><span[^>]*>([^<]+)</span>')


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory) -> Path:
    """The smoke workflow's training runs of two sweeps, tracked live into results/mlflow.db."""
    wd = workdir(tmp_path_factory.mktemp("ui"))
    proc = snakemake(
        wd,
        "--cores",
        "2",
        "--configfile",
        "config/smoke.yaml",
        "--config",
        SWEEPS,
        "--until",
        "train",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return wd


def expected_names(wd: Path) -> list[str]:
    """The MLflow name of every run directory (the card the trainer wrote into run.json)."""
    names = []
    for run_json in sorted((wd / "results/runs").glob("*/*/run.json")):
        names.append(rundir.read_json(run_json)["card"]["display_name"])
    return names


@pytest.fixture(scope="module")
def ui(smoke_store):
    """`tracking ui` on the smoke store: (the address it prints for moe-smoke, the process)."""
    port, uri = free_port(), f"sqlite:///{smoke_store / 'results/mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_impl", "tracking", "ui", "--port", str(port), "--uri", uri],
        cwd=smoke_store,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # the addresses come before the server starts
            lines.append(line)
            if line.startswith("(ready"):
                break
        urls = dict(re.findall(r"^  (\S+): (http\S+)$", "".join(lines), re.M))
        assert "moe-smoke" in urls, "".join(lines)
        browser.wait_until_up(f"http://127.0.0.1:{port}")
        yield urls["moe-smoke"], proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def rendered_names(url: str, want: int) -> list[str]:
    """The run names of the rendered runs table; rendered again (up to three times) while fewer
    than `want` show, since the page fills its table after the server answers."""
    for _ in range(3):
        dom = browser.render(url, window=(1600, 1400))
        names = RUN_LINK.findall(dom)
        if len(names) >= want:
            break
    return names, dom


def test_the_ui_opens_on_the_training_runs_each_named_once(smoke_store, ui):
    url, _ = ui
    want = expected_names(smoke_store)
    assert len(want) == 10 and "lm1b/MoE-4/seed1" in want and "news100b/MoE-256-h" in want
    names, dom = rendered_names(url, len(want))
    counts = collections.Counter(names)
    assert sorted(counts) == sorted(want), (sorted(counts), sorted(want))
    assert set(counts.values()) == {1}, counts  # every run name once
    assert ">Runs<" in dom  # the runs page of the "Model training" workflow
    assert "No data available" not in dom  # not the GenAI overview of traces
    assert ">test_perplexity<" in dom  # the saved view's first column
    assert "Group: lm1b" in dom and "Group: news100b" in dom  # grouped by sweep


def test_a_sweeps_own_view_shows_its_runs_alone(smoke_store, ui):
    url, _ = ui
    lm1b = [name for name in expected_names(smoke_store) if name.startswith("lm1b/")]
    names, _ = rendered_names(url.replace("moe-sweeps", "moe-sweep-lm1b"), len(lm1b))
    assert sorted(names) == sorted(lm1b)


def test_screenshot_of_the_runs_page(smoke_store, tmp_path):
    out = tmp_path / "runs.png"
    uri = f"sqlite:///{smoke_store / 'results/mlflow.db'}"
    args = ["tracking", "screenshot", "--out", str(out), "--uri", uri, "--port", str(free_port())]
    assert cli.main(args) == 0
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert cli.main([*args[:-2], "--port", str(free_port()), "--experiment", "nope"]) == 2
