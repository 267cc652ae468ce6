"""Shared fixtures. Tiers (markers registered in pyproject.toml):

- unit (unmarked): pure functions and in-process runs of a second or less; `make test`;
- integration: spawned process groups, MLflow stores (schema migrations), snakemake and CLI runs
  end to end, seconds each; `make test-all` or `pytest -m integration`;
- slow: minutes or GBs; `pytest -m slow`.

Every test runs with MLflow pointed at a throwaway SQLite store and its working directory in a
scratch folder, so nothing a test does can land in the repository's results/ (the store's default
place is ./results/mlflow.db, relative to the working directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what a test that falls back to the default MLflow store (or mlflow's own default) would write
_GUARDED = [
    ROOT / "results" / "mlflow.db",
    ROOT / "results" / "mlartifacts",
    ROOT / "mlflow.db",
    ROOT / "mlruns",
    ROOT / "mlartifacts",
]


def _state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    """A session-wide scratch folder: the working directory of every test."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="session")
def mlflow_store_uri(tmp_path_factory) -> str:
    """The session's default MLflow store (created on first use, so only by tests that log)."""
    return "sqlite:///" + (tmp_path_factory.mktemp("mlflow") / "mlflow.db").as_posix()


@pytest.fixture(scope="session")
def table_cache(tmp_path_factory) -> Path:
    """The session's cache of synthetic corpus tables (moe_impl/data/table_cache.py), so that no
    test writes one into the user's home."""
    return tmp_path_factory.mktemp("table_cache")


@pytest.fixture(autouse=True)
def _isolated_from_the_repository(monkeypatch, scratch, mlflow_store_uri, table_cache):
    """MLFLOW_TRACKING_URI -> the session's temporary store; MOE_CACHE_DIR -> the session's table
    cache; cwd -> a scratch folder; and a check that the repository's MLflow files were neither
    created nor modified by the test."""
    before = [_state(p) for p in _GUARDED]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store_uri)
    monkeypatch.setenv("MOE_CACHE_DIR", str(table_cache))
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(scratch)
    yield
    if "mlflow" in sys.modules:  # a test's mlflow.set_tracking_uri must not leak into the next
        sys.modules["mlflow"].set_tracking_uri(None)
    changed = [str(p) for p, b in zip(_GUARDED, before, strict=True) if _state(p) != b]
    if changed:
        pytest.fail(f"the test wrote the repository's MLflow files: {', '.join(changed)}")


@pytest.fixture(autouse=True)
def _subnormals_kept_after_each_test():
    """A CPU Trainer flushes subnormals for its process (moe_impl/runtime.py): a test that builds one
    must not change the arithmetic of the tests after it."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)
