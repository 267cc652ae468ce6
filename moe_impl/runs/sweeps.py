"""The run table of a workflow config (config/*.yaml): which runs it has, and the `python -m
moe_impl train --set` overrides of each, without Snakemake and without torch.

The workflow (workflow/rules/common.smk) builds its training jobs from `planned_runs` and checks
each run with the training's own config code; other tools (a GPU check, a script) call it on the
same YAML to list the runs:

    import yaml
    from moe_impl.runs.sweeps import planned_runs

    for run in planned_runs(yaml.safe_load(open("config/gpu.yaml"))):
        print(run.sweep, run.run, run.preset, run.overrides)

A run is one model entry of one selected sweep, once per `balance_weights` pair. Its overrides, in
order: `model.preset=<presets><entry>`, `sweep=`, `name=`, then `data.path=<data_path>` and the
`data_path_set:` overrides when `data_path` is set, the balance weights, the sweep's `set:` and the
model entry's `set:` (a later override of the same key wins). Keys the config leaves out take the
defaults of workflow/schemas/config.schema.yaml (`DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

# the schema's defaults of the keys read here (tests/test_sweeps.py holds them equal)
DEFAULTS = {"presets": "cpu/", "data_path": None, "data_path_set": {}}


class PlannedRun(NamedTuple):
    """One training run: `results/runs/<sweep>/<run>/`, trained from the full preset name with the
    `--set` overrides, in the order the train rule passes them."""

    sweep: str
    run: str
    preset: str
    overrides: list[str]


def selected_sweeps(config: Mapping) -> list[str]:
    """The sweeps that run: those named in `sweeps_to_run` (`--config 'sweeps_to_run=[lm1b]'`), in
    that order, or every sweep of the config. ValueError names a sweep the config does not have."""
    names = config.get("sweeps_to_run")
    if names is None:
        return list(config["sweeps"])
    unknown = [name for name in names if name not in config["sweeps"]]
    if unknown:
        raise ValueError(
            f"config sweeps_to_run: {', '.join(map(repr, unknown))} is not a sweep of this "
            f"config; its sweeps are {', '.join(sorted(config['sweeps']))}"
        )
    return list(names)


def model_entries(config: Mapping, sweep: str) -> Iterator[tuple[str, str, str, Mapping]]:
    """(where, run name, full preset name, the entry's `set:`) for each model entry of a sweep;
    `where` is the entry's place in the config, `sweeps.<sweep>.models[<i>]`."""
    spec = config["sweeps"][sweep]
    prefix = spec.get("presets", config.get("presets", DEFAULTS["presets"]))
    for i, entry in enumerate(spec["models"]):
        where = f"sweeps.{sweep}.models[{i}]"
        if isinstance(entry, str):
            yield where, entry, prefix + entry, {}
        else:
            yield where, entry["name"], prefix + entry["preset"], entry.get("set") or {}


def yaml_value(value) -> str:
    """A value as `--set key=<value>` writes it (train parses it back as YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return str(value)


def set_overrides(mapping: Mapping) -> list[str]:
    """`{key: value}` -> ["key=value", ...], in the mapping's order."""
    return [f"{key}={yaml_value(value)}" for key, value in mapping.items()]


def planned_runs(
    config: Mapping, check: Callable[[PlannedRun], object] | None = None
) -> list[PlannedRun]:
    """Every run of every selected sweep of a workflow config, in config order (an empty sweep,
    `models: []`, has none).

    `check`, if given, is called with each run as it is planned (the workflow resolves and
    validates it there); a ValueError it raises comes back naming the config entry, `config
    sweeps.lm1b.models[10] (MoE-1000-h): <its message>`. A run listed twice is a ValueError too.
    """
    data_path = config.get("data_path", DEFAULTS["data_path"])
    data_set = config.get("data_path_set") or DEFAULTS["data_path_set"]
    runs: list[PlannedRun] = []
    seen: set[tuple[str, str]] = set()
    for sweep in selected_sweeps(config):
        spec = config["sweeps"][sweep]
        weights = spec.get("balance_weights") or [None]
        for where, name, preset, extra in model_entries(config, sweep):
            for w in weights:
                run = name if w is None else f"{name}_wi{w[0]:g}_wl{w[1]:g}"
                overrides = [f"model.preset={preset}", f"sweep={sweep}", f"name={run}"]
                if data_path:
                    overrides.append(f"data.path={data_path}")
                    overrides += set_overrides(data_set)
                if w is not None:
                    overrides += [f"model.w_importance={w[0]:g}", f"model.w_load={w[1]:g}"]
                overrides += set_overrides(spec.get("set") or {}) + set_overrides(extra)
                planned = PlannedRun(sweep, run, preset, overrides)
                if check is not None:
                    try:
                        check(planned)
                    except ValueError as err:
                        raise ValueError(f"config {where} ({name}): {err}") from None
                if (sweep, run) in seen:
                    raise ValueError(f"config {where}: run {sweep}/{run} is listed twice")
                seen.add((sweep, run))
                runs.append(planned)
    return runs
