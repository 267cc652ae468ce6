"""TopicMarkov's successor tables cached on disk, so that a run does not redraw them at start.

Drawing the gpu/ corpus's table (1024 topics x 1024 rows x 4 successors, a Gumbel key for each of
the 1023 words of every row: 1.07 billion draws) takes ~30 s of CPU; reading it back takes
milliseconds. A table is a pure function of the config fields in `table_key` (eos_prob, max_len and
row_beta change how the chain is walked, not which successors a row holds), of the drawing code
(`TABLE_FORMAT`) and of numpy's random streams (its version is part of the key: numpy may change a
Generator's stream between releases, and a table read from disk must be the one this process would
draw).

- Where: `$MOE_CACHE_DIR/synthetic/`, else `$XDG_CACHE_HOME/moe_impl/synthetic/`, else
  `~/.cache/moe_impl/synthetic/`. Deleting the folder (or a file in it) is always safe.
- Files: `topicmarkov-V<V>-T<T>-K<K>-<hash of the key>.npz` holding the table and its key.
- Written atomically: a temporary file in the same folder, then a rename, so a reader never sees a
  partial file and concurrent writers (the ranks of one run, runs started together) are safe: they
  write the same bytes and the last rename wins.
- Verified on load: the zip's CRC-32 of every member, the stored key, the shape, dtype and value
  range. A file that fails any check is rebuilt with a warning, never used.
- Small tables (fewer than `MIN_CACHED_DRAWS` Gumbel draws, ~1 s to build) are not cached:
  drawing them costs about what reading them does, and the CPU reproduction's runs leave no files.
- A folder that cannot be written is a warning: the run goes on with the table it drew.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_ENV = "MOE_CACHE_DIR"
TABLE_FORMAT = 1  # bump whenever TopicMarkov._successor_table draws a table differently
MIN_CACHED_DRAWS = 32_000_000  # ~1 s of drawing at ~30 ns per Gumbel key
_TABLE_FIELDS = (
    "vocab_size",
    "num_topics",
    "fanout",
    "num_clusters",
    "shared_fanout",
    "zipf_s",
    "seed",
)


def cache_dir() -> Path:
    """The folder of the cached tables (module docstring: MOE_CACHE_DIR, XDG_CACHE_HOME, ~)."""
    root: str | Path | None = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg, "moe_impl") if xdg else Path.home() / ".cache" / "moe_impl"
    return Path(root) / "synthetic"


def table_key(cfg) -> dict:
    """What the table of `cfg` (a TopicMarkovConfig) depends on. With no shared slots the clusters
    draw nothing (TopicMarkov._successor_table), so num_clusters is recorded as 1 there."""
    key = {name: getattr(cfg, name) for name in _TABLE_FIELDS}
    if cfg.shared_fanout == 0:
        key["num_clusters"] = 1
    key["zipf_s"] = float(cfg.zipf_s)  # 1 and 1.0 draw the same table
    return {"format": TABLE_FORMAT, "numpy": np.__version__, **key}


def table_path(cfg) -> Path:
    key = table_key(cfg)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"topicmarkov-V{cfg.vocab_size}-T{cfg.num_topics}-K{cfg.fanout}-{digest}.npz"
    return cache_dir() / name


def table_draws(cfg) -> int:
    """Gumbel keys drawn to build the table: one per word for each row of each topic, and of each
    cluster's shared rows."""
    tables = cfg.num_topics + (cfg.num_clusters if cfg.shared_fanout else 0)
    return tables * (cfg.vocab_size + 1) * cfg.vocab_size


def load_or_build(cfg, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The successor table of `cfg`: read from the cache when a valid file is there, else drawn by
    `build()` and, when it is large enough to be worth it, written to the cache."""
    if table_draws(cfg) < MIN_CACHED_DRAWS:
        return build()
    path = table_path(cfg)
    if path.exists():
        try:
            return _read(path, cfg)
        except Exception as err:  # any failure to read or verify: rebuild, never trust the file
            warnings.warn(
                f"cached successor table {path} is unusable ({err}); rebuilding it", stacklevel=3
            )
    table = build()
    _write(path, table, cfg)
    return table


def _expected_shape(cfg) -> tuple[int, int, int]:
    return (cfg.num_topics, cfg.vocab_size + 1, cfg.fanout)


def _read(path: Path, cfg) -> np.ndarray:
    """The table in `path`, after every check (zipfile verifies each member's CRC-32 as it is
    read); ValueError naming the first that fails."""
    with np.load(path, allow_pickle=False) as npz:
        stored_key = json.loads(str(npz["key"]))
        table = npz["table"]
    if stored_key != table_key(cfg):
        raise ValueError(f"it holds the table of {stored_key}")
    if table.dtype != np.int32 or table.shape != _expected_shape(cfg):
        raise ValueError(f"{table.dtype} {table.shape}, expected int32 {_expected_shape(cfg)}")
    if table.min() < 0 or table.max() >= cfg.vocab_size:
        raise ValueError(f"successor ids outside [0, {cfg.vocab_size})")
    return table


def _write(path: Path, table: np.ndarray, cfg) -> None:
    """`table` to `path` atomically (a temporary file in the same folder, then a rename); a folder
    that cannot be written is a warning (the caller has the table)."""
    key = json.dumps(table_key(cfg), sort_keys=True)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as f:
            tmp = Path(f.name)
            np.savez(f, table=table, key=np.array(key))
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # a cache others may read (the temporary file was private)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not cache the successor table in {path} ({err})", stacklevel=3)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
