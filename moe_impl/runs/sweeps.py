"""The run table of a workflow config (config/*.yaml): which runs it has, and the `python -m
moe_impl train --set` overrides of each, without Snakemake and without torch.

The workflow's run table (moe_impl/train/runtable.py) is `planned_runs` with each run resolved and
checked by the training's own config code; other tools (a GPU check, a script) call it on the
same YAML to list the runs:

    import yaml
    from moe_impl.runs.sweeps import planned_runs

    for run in planned_runs(yaml.safe_load(open("config/gpu.yaml"))):
        print(run.sweep, run.run, run.preset, run.overrides)

A run is one model entry of one selected sweep, once per `balance_weights` pair and per seed. Its
overrides, in order: `model.preset=<presets><entry>`, `sweep=`, `name=`, `experiment=` where the
config names one (else the training config's, `moe`, holds), then `data.path=<data_path>`
and the `data_path_set:` overrides when `data_path` is set, the balance weights, the sweep's `set:`,
the model entry's `set:` (a later override of the same key wins) and last `train.seed=<seed>`. Keys
the config leaves out take the defaults of workflow/schemas/config.schema.yaml (`DEFAULTS`).

Seeds: `seeds:` of the model entry (its mapping form), else of the sweep, else `[0]`: a non-empty
list of distinct non-negative integers, one run each. Seed 0 keeps the run's name (`MoE-32`, so a
config without `seeds` plans the runs and results paths it always did, at train.seed=0 as before);
another seed S appends `_seed<S>` (`MoE-32_seed1`, `MoE-256_wi0.1_wl0.1_seed1`). The seed of a run
is its seeds' (the schema fills in the default, so the workflow cannot tell an absent `seeds` from
`[0]`): a `train.seed` in the sweep's or a model entry's `set:` is an error naming the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

# the schema's defaults of the keys read here (tests/test_sweeps.py holds them equal); `seeds` is
# a key of each sweep (`sweeps.<name>.seeds` in the schema) and of a model entry
DEFAULTS: dict[str, Any] = {"presets": "cpu/", "data_path": None, "data_path_set": {}, "seeds": [0]}
SEED_KEY = "train.seed"


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


class ModelEntry(NamedTuple):
    """One model entry of a sweep: `where` is its place in the config, `sweeps.<sweep>.models[<i>]`;
    `extra` its `set:`; `seeds` its own seeds, else the sweep's, else DEFAULTS'."""

    where: str
    name: str
    preset: str
    extra: Mapping
    seeds: list[int]


def check_seeds(seeds, where: str) -> list[int]:
    """`seeds` as a list, or ValueError naming `where` (`sweeps.lm1b.seeds`) and the bad value:
    it must be a non-empty list of distinct non-negative integers."""
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"config {where}: must be a non-empty list of seeds, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"config {where}: seeds must be non-negative integers, got {seed!r} in {seeds!r}"
            )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config {where}: seeds must be distinct, got {seeds!r}")
    return list(seeds)


def model_entries(config: Mapping, sweep: str) -> Iterator[ModelEntry]:
    """Each model entry of a sweep, its seeds checked (check_seeds); a train.seed in the sweep's or
    the entry's `set:` is a ValueError naming the entry (the seeds choose the seed)."""
    spec = config["sweeps"][sweep]
    prefix = spec.get("presets", config.get("presets", DEFAULTS["presets"]))
    sweep_seeds = check_seeds(spec.get("seeds", DEFAULTS["seeds"]), f"sweeps.{sweep}.seeds")
    sweep_set = spec.get("set") or {}
    extra: Mapping  # the entry's `set:`
    for i, entry in enumerate(spec["models"]):
        where = f"sweeps.{sweep}.models[{i}]"
        if isinstance(entry, str):
            name, preset, extra, seeds = entry, entry, {}, sweep_seeds
        else:
            name, preset, extra = entry["name"], entry["preset"], entry.get("set") or {}
            seeds = sweep_seeds
            if "seeds" in entry:
                seeds = check_seeds(entry["seeds"], f"{where}.seeds")
        if SEED_KEY in extra or SEED_KEY in sweep_set:
            whose = "its set:" if SEED_KEY in extra else f"sweeps.{sweep}.set"
            raise ValueError(
                f"config {where} ({name}): {SEED_KEY} in {whose}; the seeds choose a run's "
                f"training seed (seeds: {seeds}), set them instead"
            )
        yield ModelEntry(where, name, prefix + preset, extra, seeds)


def run_name(name: str, weights: list | tuple | None, seed: int) -> str:
    """`MoE-256`, `MoE-256_wi0.1_wl0.1`, `MoE-256_seed1`, `MoE-256_wi0.1_wl0.1_seed1`: seed 0
    adds nothing."""
    run = name if weights is None else f"{name}_wi{weights[0]:g}_wl{weights[1]:g}"
    return run if seed == 0 else f"{run}_seed{seed}"


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
    `models: []`, has none): per model entry, each balance-weights pair, each seed in turn.

    `check`, if given, is called with each run as it is planned (the workflow resolves and
    validates it there); a ValueError it raises comes back naming the config entry, `config
    sweeps.lm1b.models[10] (MoE-1000-h): <its message>`. A run listed twice is a ValueError too.
    """
    data_path = config.get("data_path", DEFAULTS["data_path"])
    experiment = config.get("experiment")
    data_set = config.get("data_path_set") or DEFAULTS["data_path_set"]
    runs: list[PlannedRun] = []
    seen: set[tuple[str, str]] = set()
    for sweep in selected_sweeps(config):
        spec = config["sweeps"][sweep]
        weights = spec.get("balance_weights") or [None]
        for where, name, preset, extra, seeds in model_entries(config, sweep):
            for w, seed in ((w, seed) for w in weights for seed in seeds):
                run = run_name(name, w, seed)
                overrides = [f"model.preset={preset}", f"sweep={sweep}", f"name={run}"]
                if experiment:
                    overrides.append(f"experiment={experiment}")
                if data_path:
                    overrides.append(f"data.path={data_path}")
                    overrides += set_overrides(data_set)
                if w is not None:
                    overrides += [f"model.w_importance={w[0]:g}", f"model.w_load={w[1]:g}"]
                overrides += set_overrides(spec.get("set") or {}) + set_overrides(extra)
                overrides.append(f"{SEED_KEY}={seed}")
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
