"""A run's identity: the values of its resolved config, not the text of a YAML file.

`--resume` continues a run directory only when the config given resolves to the same values as the
saved `config.yaml` (read back with the same loader, `load_config`), so `1.0` and `1`, a repeated
default or the saved file itself are the same run. Keys that say how a segment executes, not what
it computes (`EXECUTION_KEYS`), may differ. `differences` lists what changed as dotted keys;
`set_aside` moves a run directory out of the way, keeping every file, for `--replace-changed`
(and the workflow); `fingerprint` is a short hash of the identity that the workflow's train rule
records, so that Snakemake re-trains exactly the runs whose values changed. A key added later
(`ADDED_KEYS`) is left out of the identity at the value that reproduces the code before it, so
adding it changes no earlier run's fingerprint. Torch-free: the workflow imports it while parsing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from moe_impl.runs import rundir, runinfo
from moe_impl.train.config import RunConfig, load_config

# how a segment runs, not what it computes: a resumed segment may use other values
EXECUTION_KEYS = frozenset({"train.threads", "train.progress", "train.prefetch_workers"})

# keys added after runs were made, with the value that computes exactly what the code did before
# the key existed: at that value a key is left out of the identity, so the fingerprint of every
# earlier run stays the same (the workflow retrains nothing of an existing results tree); any
# other value is part of the identity like every key
ADDED_KEYS: dict[str, object] = {
    "train.micro_batches": 1,  # issue 28: gradient accumulation; 1 = the whole batch at once
    # issue 31: the window of dead_expert_fraction (recorded only; every value trains the same)
    "train.dead_expert_window": 100,
    # issue 29: the gate matmuls' precision (float32: the gate as before) and compiled routing
    "model.gate_precision": "float32",
    "model.compile": False,
}

ASIDE_MARK = rundir.ASIDE_MARK  # D -> D.parent / ".{D.name}.replaced-<UTC time>"


def identity(cfg: RunConfig) -> dict[str, object]:
    """{dotted key: value} of every config value that defines the run (EXECUTION_KEYS left out,
    and ADDED_KEYS at their earlier behaviour's value)."""
    flat = runinfo.flatten(cfg.to_dict(), as_text=False)
    return {
        key: value
        for key, value in flat.items()
        if key not in EXECUTION_KEYS and not (key in ADDED_KEYS and value == ADDED_KEYS[key])
    }


def differences(saved: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) for each identity value that differs, in config order
    (values compare as values: 1 == 1.0); an ADDED_KEYS key that one side leaves out counts with
    its earlier behaviour's value, and comes last."""
    old, now = identity(saved), identity(new)
    keys = [*old, *(key for key in now if key not in old)]
    return [
        (key, _value(old, key), _value(now, key))
        for key in keys
        if _value(old, key) != _value(now, key)
    ]


def _value(values: dict[str, object], key: str) -> object:
    """An identity's value of `key`; an ADDED_KEYS key it leaves out has its earlier value."""
    return values[key] if key in values else ADDED_KEYS[key]


def describe(diffs: list[tuple[str, object, object]]) -> str:
    """`train.lr 0.01 -> 0.02, model.k 2 -> 1` (values as JSON: null, true, "text", [1, 2])."""
    return ", ".join(f"{key} {_text(old)} -> {_text(new)}" for key, old, new in diffs)


def saved_config(run_dir: str | Path) -> RunConfig | None:
    """The config a run directory was started with (None when it has none); ValueError names the
    file when it cannot be read."""
    path = Path(run_dir) / rundir.CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config([path])
    except ValueError as err:
        raise ValueError(f"the saved config of {str(run_dir)!r} cannot be read: {err}") from None


def changes(run_dir: str | Path, cfg: RunConfig) -> list[tuple[str, object, object]] | None:
    """What differs between the run in run_dir and `cfg` ([] for the same run, None when the
    directory holds no config)."""
    saved = saved_config(run_dir)
    return None if saved is None else differences(saved, cfg)


def set_aside(run_dir: str | Path) -> Path:
    """Rename run_dir to a hidden sibling `.NAME.replaced-<UTC time>` (every file kept; hidden so
    that whatever scans for run directories, e.g. `analysis collect`, skips it) and return it."""
    run_dir = Path(run_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir.parent / f".{run_dir.name}{ASIDE_MARK}{stamp}"
    n = 0
    while target.exists():  # two replacements within a second
        n += 1
        target = run_dir.parent / f".{run_dir.name}{ASIDE_MARK}{stamp}-{n}"
    run_dir.rename(target)
    return target


def fingerprint(cfg: RunConfig) -> str:
    """A short hash of the run's identity: equal exactly when `differences` finds nothing."""
    values = {key: _canonical(value) for key, value in identity(cfg).items()}
    text = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _text(value) -> str:
    return json.dumps(value)


def _canonical(value):
    """One form per value: integral floats as ints (1.0 == 1), lists of canonical values."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value
