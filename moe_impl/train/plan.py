"""The plan of a workflow config, for a user to read before spending GPU hours: every run with its
regime beside the paper's (Sec. 3.1's tokens per expert per step, training tokens per parameter,
App. C.1 / D's batch and steps: moe_impl/model/regime.py), and its estimated peak memory and wall
time (moe_impl/runs/resources.py, from the measurements in workflow/resources/). What
`python -m moe_impl plan` prints; torch-free (each run is resolved as the workflow resolves it,
moe_impl/train/runtable.py, by the training config's own loader).

A run on a CUDA device gets device memory and time from step_times.yaml's `cuda` measurements;
a CPU run gets its host memory from peak_memory.yaml and its time from the measured training
throughput of the same preset in results/reference/summary.csv (the default reproduction on our
2-core machine), where there is one. A model without a measurement of its own takes that of the
measured model of its device with the same MoE structure and expert count (a `proxy`, named in
the row's source: its time and activations are that model's); with none, the row says
"not measured" and the total counts only what was estimated (`unestimated` lists the rest).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_impl.model import regime
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.runs import resources
from moe_impl.runs.sweeps import planned_runs
from moe_impl.train import runtable
from moe_impl.train.prefetch import resolve_workers

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_SUMMARY = ROOT / "results" / "reference" / "summary.csv"


@dataclass(frozen=True)
class PlanRow:
    """One run of the plan; `paper_*` are the paper's values for the model it stands for (None
    where the paper has no such model), `*_source` say where an estimate comes from."""

    sweep: str
    run: str
    preset: str
    device: str
    num_experts: int
    params: int
    batch_positions: int
    micro_batches: int
    steps: int
    train_tokens: int
    tokens_per_expert_per_step: float | None
    tokens_per_parameter: float
    paper_batch_positions: int | None
    paper_steps: int | None
    paper_tokens_per_expert_per_step: float | None
    paper_tokens_per_parameter: float | None
    host_mem_mb: int
    host_mem_source: str
    device_peak_gib: float | None
    device_peak_source: str | None
    step_s: float | None
    hours: float | None
    time_source: str


@dataclass(frozen=True)
class Plan:
    config: str
    rows: list[PlanRow]
    total_hours: float  # of the rows with an estimate
    unestimated: list[str]  # sweep/run without a time estimate
    max_device_peak_gib: float | None

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _measurement(entries: Mapping, preset: str, model, params: int) -> tuple[dict | None, str]:
    """(the step_times.yaml entry measured for this preset at this parameter count, ""), else a
    proxy's: the measured model of the same MoE structure and expert count, with its name; else
    (None, "")."""
    own = entries.get(preset)
    if own is not None and own.get("params", params) == params:
        return own, ""
    for name, entry in entries.items():  # the same model under another family's name
        if ALL_PRESETS.get(name) == model:
            return entry, ""
    for name, entry in entries.items():
        other = ALL_PRESETS.get(name)
        if other is not None and (other.moe, other.num_experts) == (model.moe, model.num_experts):
            return entry, f"proxy {name}: "
    return None, ""


def _cpu_throughput(reference: Path) -> dict[str, float]:
    """preset -> training tokens per second measured in the reference reproduction (the mean over
    its runs), {} without one."""
    if not reference.is_file():
        return {}
    rates: dict[str, list[float]] = {}
    with reference.open() as f:
        for row in csv.DictReader(f):
            try:
                rates.setdefault(row["preset"], []).append(float(row["tokens_per_second"]))
            except (KeyError, ValueError):
                continue
    return {preset: sum(v) / len(v) for preset, v in rates.items() if v}


def eval_positions(cfg, steps: int) -> int:
    """Positions the run evaluates: eval.tokens at every snapshot before the end and at the end
    (the whole split of a finite corpus is not known here: counted as eval.tokens or 0)."""
    per_step = cfg.train.tokens_per_step
    snapshots = {-(-t // per_step) for t in cfg.eval.at_tokens} - {steps}
    return (cfg.eval.tokens or 0) * (len(snapshots) + 1)


def plan_row(run: runtable.Run, measured: dict, cpu_rates: dict) -> PlanRow:
    cfg, model, params, host = run.config, run.model, run.params, run.host_mem
    train = cfg.train
    micro = train.micro_batches
    per_step, per_pass = train.tokens_per_step, train.tokens_per_step // micro
    if train.tokens is None:
        raise ValueError(
            f"{run.sweep}/{run.run}: train.epochs={train.epochs}: the plan needs train.tokens "
            "(an epoch's steps depend on the corpus files)"
        )
    steps = max(1, -(-train.tokens // per_step))
    reg = regime.regime(model, tokens_per_step=per_step, steps=steps, sweep=cfg.sweep)
    device = train.device.split(":")[0]
    device_peak = step = None
    source = "not measured"
    workers = prefetch_workers(cfg)
    if device == "cuda":
        entries = (measured.get("cuda") or {}).get("models") or {}
        entry, proxy = _measurement(entries, run.preset, model, params)
        if entry is not None:
            entry = {**entry, "source": proxy + entry["source"]}
            device_peak = resources.device_peak_gib(
                entry,
                params=params,
                num_experts=model.num_experts,
                tokens_per_pass=per_pass,
                micro_batches=micro,
            )
            step = resources.step_seconds(
                entry,
                tokens_per_step=per_step,
                input_tokens_per_s=_input_rate(measured.get("cuda") or {}, workers),
                prefetch=workers > 0,
            )
    elif run.preset in cpu_rates:
        step = resources.Estimate(
            per_step / cpu_rates[run.preset],
            f"measured throughput in {REFERENCE_SUMMARY.relative_to(ROOT)}",
        )
    hours = None
    if step is not None:
        source = step.source
        hours = resources.run_hours(steps, step.value, eval_positions(cfg, steps), per_step)
    return PlanRow(
        sweep=run.sweep,
        run=run.run,
        preset=run.preset,
        device=train.device,
        num_experts=model.num_experts,
        params=params,
        batch_positions=per_step,
        micro_batches=micro,
        steps=steps,
        train_tokens=steps * per_step,
        tokens_per_expert_per_step=reg["tokens_per_expert_per_step"],
        tokens_per_parameter=reg["tokens_per_parameter"],
        paper_batch_positions=reg["paper_batch_positions"],
        paper_steps=reg["paper_steps"],
        paper_tokens_per_expert_per_step=reg["paper_tokens_per_expert_per_step"],
        paper_tokens_per_parameter=reg["paper_tokens_per_parameter"],
        host_mem_mb=run.mem_mb,
        host_mem_source=host.source,
        device_peak_gib=None if device_peak is None else device_peak.value,
        device_peak_source=None if device_peak is None else device_peak.source,
        step_s=None if step is None else step.value,
        hours=hours,
        time_source=source,
    )


def prefetch_workers(cfg) -> int:
    """The run's batch-making processes, as the trainer resolves `train.prefetch_workers`
    (moe_impl/train/prefetch.py: only the synthetic corpus; null: 2 on CUDA, inline on CPU)."""
    device = cfg.train.device.split(":")[0]
    return resolve_workers(cfg.train.prefetch_workers, cfg.data.corpus, device)


def _input_rate(device: Mapping, workers: int) -> float | None:
    """Training input tokens per second on the device's host: one process's rate (the trainer's
    input path's measured `ms_per_batch` there, or today's generator's `reference_ms_per_batch`
    times `speedup`, the trainer's path against it as `bench --data` measured it) times the
    workers (at least one: inline generation is one process)."""
    source = device.get("input") or {}
    if source.get("ms_per_batch"):  # the trainer's input path itself (what gpu-check writes)
        one = source["tokens_per_batch"] / (source["ms_per_batch"] / 1e3)
    elif source.get("reference_ms_per_batch"):
        one = source["tokens_per_batch"] / (source["reference_ms_per_batch"] / 1e3)
        one *= source.get("speedup", 1.0)
    else:
        return None
    return one * max(workers, 1)


def merged(configs: list[dict]) -> dict:
    """Workflow configs merged as Snakemake merges several --configfile: a later file's mappings
    key by key into the earlier's (recursively), its other values replacing them."""
    out: dict = {}
    for config in configs:
        _merge_into(out, config)
    return out


def _merge_into(base: dict, more: Mapping) -> None:
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def read_configs(paths: list[str | Path]) -> dict:
    import yaml

    configs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"--configfile {str(path)!r}: no such file")
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{path}: not a workflow config (a YAML mapping)")
        configs.append(config)
    config = merged(configs)
    if "train_config" not in config:
        raise ValueError(f"{', '.join(map(str, paths))}: not a workflow config (no train_config)")
    return config


def plan(
    config_paths: str | Path | list[str | Path], *, root: str | Path = ROOT, resources_dir=None
) -> Plan:
    """The plan of the workflow config at config_paths (several: merged as Snakemake merges them;
    the train_config is read relative to root)."""
    paths = [config_paths] if isinstance(config_paths, str | Path) else list(config_paths)
    config = read_configs(paths)
    train_config = Path(root) / config["train_config"]
    measured = resources.load(resources.STEP_TIMES_FILE, resources_dir)
    peaks = resources.load(resources.PEAK_MEMORY_FILE, resources_dir)
    cpu_rates = _cpu_throughput(Path(root) / REFERENCE_SUMMARY.relative_to(ROOT))
    rows = [
        plan_row(runtable.resolve(run, train_config, peaks), measured, cpu_rates)
        for run in planned_runs(config)
    ]
    peaks_gib = [r.device_peak_gib for r in rows if r.device_peak_gib is not None]
    return Plan(
        config=" + ".join(map(str, paths)),
        rows=rows,
        total_hours=sum(r.hours for r in rows if r.hours is not None),
        unestimated=[f"{r.sweep}/{r.run}" for r in rows if r.hours is None],
        max_device_peak_gib=max(peaks_gib) if peaks_gib else None,
    )
