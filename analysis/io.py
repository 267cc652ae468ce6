"""Every file the analysis reads or writes: run directories, the benchmark, CSVs, figures, tables.

The rest of `analysis/` is pure (frames in, frames or figures out). Run directories follow
`moe_impl/runs/rundir.py` (config.yaml, summary.json, run.json, expert_load.json; the presence of
summary.json marks a finished run); the benchmark files are `python -m moe_impl bench`'s bench.json
(a list of rows, moe_impl/cli/bench.py). Paper numbers come from `analysis.paper` (packaged CSVs).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from moe_impl.runs import rundir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_FORMATS = ("png", "pdf")
FIGURE_DPI = 150
BENCH_KEYS = ("kind", "num_experts", "tokens_mode")  # what the figures select bench rows by


def find_run_dirs(roots: str | Path | Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories under the root(s), sorted; a run directory is a
    folder with run.json or summary.json (checkpoints/ and hidden folders below a root are not
    searched). A root may be a run directory itself: the workflow passes exactly the runs its
    config plans, so that another config's runs in the same results/runs never reach its report."""
    roots = [roots] if isinstance(roots, str | Path) else list(roots)
    dirs: set[Path] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise ValueError(f"--runs {str(root)!r} is not a directory")
        dirs |= {
            p.parent
            for name in (rundir.RUN_FILE, rundir.SUMMARY_FILE)
            for p in root.rglob(name)
            if not _skipped(p.relative_to(root).parts)
        }
    finished = sorted(d for d in dirs if rundir.is_finished(d))
    return finished, sorted(dirs - set(finished))


def _skipped(parts: tuple[str, ...]) -> bool:
    """A file below a checkpoints/ or hidden folder (a set-aside run, .snakemake) of the root."""
    return rundir.CHECKPOINT_DIR in parts or any(s.startswith(".") for s in parts)


def _read_json(path: Path) -> dict | None:
    """A JSON object from path, None when the file is absent; anything else (not JSON, not an
    object) is a ValueError naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not valid JSON ({first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {kind_of(data)}")
    return data


def kind_of(value) -> str:
    """A value's kind in a message: 'a list ([1, 2])', 'a string ('x')'."""
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    name = names.get(type(value), f"a {type(value).__name__}")
    return name if value is None else f"{name} ({str(value)[:40]})"


def _read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not valid YAML ({first})") from None
    config = config or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping, got {kind_of(config)}")
    return config


def _check_expert_load(path: Path, load: dict | None) -> None:
    """expert_load.json: {"steps": n, "tokens_per_expert": [numbers]} (rundir.py)."""
    if load is None:
        return
    tokens = load.get("tokens_per_expert")
    if not isinstance(tokens, list) or not all(is_number(t) for t in tokens):
        raise ValueError(
            f"{path}: tokens_per_expert should be a list of numbers, got {kind_of(tokens)}"
        )
    steps = load.get("steps")
    if steps is not None and not is_number(steps):
        raise ValueError(f"{path}: steps should be a number, got {kind_of(steps)}")


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_run(run_dir: str | Path) -> dict:
    """One run directory's files as dicts: {"run_dir", "config", "summary", "identity",
    "expert_load"} (None for a missing optional file; config.yaml and summary.json required).
    A file that is there but malformed stops the analysis with one line naming it: a report that
    quietly left a run out, or read it as NaN, would judge the claims on other runs than planned."""
    run_dir = Path(run_dir)
    config_path = run_dir / rundir.CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no {rundir.CONFIG_FILE}")
    config = _read_yaml(config_path)
    summary = _read_json(run_dir / rundir.SUMMARY_FILE)
    if summary is None:
        raise ValueError(f"{run_dir}: unfinished (no {rundir.SUMMARY_FILE})")
    load_path = run_dir / rundir.EXPERT_LOAD_FILE
    load = _read_json(load_path)
    _check_expert_load(load_path, load)
    return {
        "run_dir": str(run_dir),
        "config": config,
        "summary": summary,
        "identity": _read_json(run_dir / rundir.RUN_FILE) or {},
        "expert_load": load,
    }


def read_bench(paths: list[str | Path]) -> pd.DataFrame:
    """The rows of one or more bench.json files (one per tokens mode, say), with `source_file`."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"--bench {str(path)!r} does not exist")
        expected = "expected the list of benchmark rows `python -m moe_impl bench --json` writes"
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # not UTF-8, not JSON (an empty file among them)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"--bench {path}: not JSON ({first}); {expected}") from None
        if not isinstance(rows, list) or not rows:
            got = "an empty list" if rows == [] else f"a JSON {type(rows).__name__}"
            raise ValueError(f"--bench {path}: {expected}, got {got}")
        for i, row in enumerate(rows):
            missing = [k for k in BENCH_KEYS if k not in row] if isinstance(row, dict) else None
            if missing != []:
                what = f"lacks {missing}" if missing else f"is not an object: {str(row)[:40]}"
                raise ValueError(f"--bench {path}: row {i} {what}; {expected}")
        frames.append(pd.DataFrame(rows).assign(source_file=str(path)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@contextlib.contextmanager
def _writing(path: Path):
    """An output that cannot be written (a read-only or full disk, a file where a folder should
    be) is one line naming it, not an OSError traceback."""
    try:
        yield
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
    return path


def read_csv(path: str | Path, *, required: bool = True) -> pd.DataFrame:
    """A CSV written by write_csv; an absent optional file gives an empty frame."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise ValueError(f"{str(path)!r} does not exist (run `python -m analysis collect`)")
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def save_figure(fig: Figure, folder: str | Path, name: str) -> list[Path]:
    """folder/name.png and folder/name.pdf."""
    folder = Path(folder)
    paths = [folder / f"{name}.{ext}" for ext in FIGURE_FORMATS]
    for path in paths:
        with _writing(path):
            folder.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=FIGURE_DPI)
    return paths


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path
