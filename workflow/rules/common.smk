# Config validation and the run table: which runs exist, and the `python -m moe_impl train`
# overrides of each. No rules here. Every run is checked at parse time through the same code the
# training uses (moe_impl.train.config), so a bad expert count or key fails before any job starts,
# with a message naming the config entry.

import shlex
from pathlib import Path

from snakemake.utils import validate

from moe_impl.bench.spec import parse_experts
from moe_impl.model.flops import total_params
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.train.config import load_config, model_config


validate(config, schema="../schemas/config.schema.yaml")

RUNS_DIR = "results/runs"
# starts `python -m moe_impl` on one process, torchrun, or srun + torchrun (gpus_per_run, nodes_per_run)
LAUNCH = str(Path(workflow.basedir) / "workflow" / "scripts" / "launch.sh")


def _model_entries(sweep, spec):
    """(run name, full preset name, extra overrides) for each model entry of a sweep."""
    prefix = spec.get("presets", config["presets"])
    for i, entry in enumerate(spec["models"]):
        where = f"sweeps.{sweep}.models[{i}]"
        if isinstance(entry, str):
            yield where, entry, prefix + entry, {}
        else:
            yield where, entry["name"], prefix + entry["preset"], entry.get("set", {})


def _overrides(mapping):
    return [f"{key}={_yaml(value)}" for key, value in mapping.items()]


def _yaml(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def processes_per_run():
    return max(1, config["gpus_per_run"]) * config["nodes_per_run"]


def train_resources():
    """SLURM resources of a training job: one node with gpus_per_run GPUs (`gpu`: sbatch --gpus), or
    nodes_per_run whole nodes with gpus_per_run GPUs and one task each. `mpi` tells the SLURM plugin
    that the job starts its own srun (workflow/scripts/launch.sh), so it does not wrap the command
    in `srun -n1`, which would leave one task for the per-node torchruns."""
    gpus, nodes = config["gpus_per_run"], config["nodes_per_run"]
    if nodes == 1:
        return {"gpu": gpus, "nodes": 1, "slurm_extra": ""}
    return {
        "gpu": 0,  # GPUs per node, below: sbatch --gpus would let SLURM split them unevenly
        "nodes": nodes,
        "slurm_extra": f"--gpus-per-node={gpus} --ntasks-per-node=1 --exclusive",
    }


TRAIN_RESOURCES = train_resources()


def check_divisible(cfg):
    """An expert-parallel run splits its batches' rows evenly over its processes."""
    world = processes_per_run()
    for section in ("train", "eval"):
        rows = cfg[section]["batch_size"]
        if rows % world:
            raise ValueError(
                f"{section}.batch_size={rows} must be divisible by gpus_per_run x nodes_per_run = "
                f"{world} processes"
            )


def build_runs():
    """{(sweep, run): {"preset", "overrides", "config"}} for every run of every sweep."""
    runs = {}
    for sweep, spec in config["sweeps"].items():
        weights = spec.get("balance_weights") or [None]
        for where, name, preset, extra in _model_entries(sweep, spec):
            for w in weights:
                run = name if w is None else f"{name}_wi{w[0]:g}_wl{w[1]:g}"
                overrides = [f"model.preset={preset}", f"sweep={sweep}", f"name={run}"]
                if config.get("data_path"):
                    overrides.append(f"data.path={config['data_path']}")
                if w is not None:
                    overrides += [f"model.w_importance={w[0]:g}", f"model.w_load={w[1]:g}"]
                overrides += _overrides(spec.get("set", {})) + _overrides(extra)
                try:
                    cfg = load_config([config["train_config"]], overrides)
                    check_divisible(cfg)
                except ValueError as err:
                    raise ValueError(f"config {where} ({name}): {err}") from None
                if (sweep, run) in runs:
                    raise ValueError(f"config {where}: run {sweep}/{run} is listed twice")
                runs[(sweep, run)] = {"preset": preset, "overrides": overrides, "config": cfg}
    return runs


RUNS = build_runs()
try:
    parse_experts(",".join(config["bench"]["experts"]))
except ValueError as err:
    raise ValueError(f"config bench.experts: {err}") from None


def run_dir(sweep, run):
    return f"{RUNS_DIR}/{sweep}/{run}"


def all_summaries():
    return [f"{run_dir(s, r)}/summary.json" for s, r in RUNS]


def train_args(wildcards):
    """The --set arguments of one run, shell-quoted."""
    overrides = RUNS[(wildcards.sweep, wildcards.run)]["overrides"]
    return " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def train_mem_mb(wildcards):
    """Memory estimate for the scheduler: parameters with dense Adam (16 B each: weights, grads,
    two moments) below 4096 experts, sparse grads + factored Adam (~5 B) from there, plus 1.5 GB."""
    run = RUNS[(wildcards.sweep, wildcards.run)]
    # the corpus fixes the real vocabulary; the preset's is the estimate (793,471 for lm1b/...)
    model = model_config(run["config"], vocab_size=ALL_PRESETS[run["preset"]].vocab_size)
    n = total_params(model)
    per_param = 5 if model.num_experts >= 4096 else 16
    return int(1500 + n * per_param / 2**20)


def checked_data():
    """Real corpora are checked once before any training job (rule check_data)."""
    corpora = {r["config"]["data"]["corpus"] for r in RUNS.values()}
    return ["results/data.ok"] if corpora - {"synthetic"} else []


def first_real_run_args():
    for run in RUNS.values():
        if run["config"]["data"]["corpus"] != "synthetic":
            return " ".join(f"--set {shlex.quote(o)}" for o in run["overrides"])
    return ""


FIGURES = ["figure2_left", "figure2_right", "figure3", "table6_balance", "perf_scaling", "efficiency"]
TABLES = [f"results/tables/table{n}.{ext}" for n in (6, 7, 8) for ext in ("md", "csv", "tex")]


def analysis_outputs():
    return [f"results/figures/{name}.png" for name in FIGURES] + ["results/REPORT.md"]
