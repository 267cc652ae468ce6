# Config validation and the run table: which runs exist, and the `python -m moe_impl train`
# overrides of each. No rules here: the rules' input functions and params are the get_* helpers
# below. Every run is checked at parse time through the same code the training uses
# (moe_impl.train.config, called from run_config only), so a bad expert count or key fails before
# any job starts, with a message naming the config entry. Nothing imported here loads torch or
# matplotlib.

import shlex
from pathlib import Path

from snakemake.utils import validate

from analysis.figures import FIGURES
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


def run_config(preset, overrides):
    """What the workflow reads of a run's training config, built and checked by the training's own
    code (moe_impl.train.config): the corpus, the batch sizes and the model's size."""
    cfg = load_config([config["train_config"]], overrides)
    # the corpus fixes the real vocabulary; the preset's is the estimate (793,471 for lm1b/...)
    model = model_config(cfg, vocab_size=ALL_PRESETS[preset].vocab_size)
    return {
        "corpus": cfg.data.corpus,
        "batch_size": {"train": cfg.train.batch_size, "eval": cfg.eval.batch_size},
        "params": total_params(model),
        "num_experts": model.num_experts,
    }


def check_divisible(batch_size):
    """An expert-parallel run splits its batches' rows evenly over its processes."""
    world = processes_per_run()
    for section, rows in batch_size.items():
        if rows % world:
            raise ValueError(
                f"{section}.batch_size={rows} must be divisible by gpus_per_run x nodes_per_run = "
                f"{world} processes"
            )


def build_runs():
    """{(sweep, run): {"overrides", and run_config's keys}} for every run of every sweep."""
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
                    overrides += [
                        f"model.w_importance={w[0]:g}",
                        f"model.w_load={w[1]:g}",
                    ]
                overrides += _overrides(spec.get("set", {})) + _overrides(extra)
                try:
                    cfg = run_config(preset, overrides)
                    check_divisible(cfg["batch_size"])
                except ValueError as err:
                    raise ValueError(f"config {where} ({name}): {err}") from None
                if (sweep, run) in runs:
                    raise ValueError(
                        f"config {where}: run {sweep}/{run} is listed twice"
                    )
                runs[(sweep, run)] = {"overrides": overrides, **cfg}
    return runs


RUNS = build_runs()
try:
    parse_experts(",".join(config["bench"]["experts"]))
except ValueError as err:
    raise ValueError(f"config bench.experts: {err}") from None


def run_dir(sweep, run):
    return f"{RUNS_DIR}/{sweep}/{run}"


def set_args(overrides):
    """`python -m moe_impl train` arguments for these overrides, shell-quoted."""
    return " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def get_run_summaries():
    """Every run's summary.json (rules all, collect)."""
    return [f"{run_dir(s, r)}/summary.json" for s, r in RUNS]


def get_run_dir(wildcards):
    """The run directory `train --out` writes (rule train)."""
    return run_dir(wildcards.sweep, wildcards.run)


def get_train_args(wildcards):
    """The --set arguments of one run (rule train)."""
    return set_args(RUNS[(wildcards.sweep, wildcards.run)]["overrides"])


def get_process_threads(wildcards, threads):
    """CPU threads of each process of a run: the job's cores shared by one node's processes."""
    return max(1, threads // max(1, config["gpus_per_run"]))


def get_train_mem_mb(wildcards):
    """The scheduler's memory estimate of a training job: parameters with dense Adam (16 B each:
    weights, grads, two moments) below 4096 experts, sparse grads + factored Adam (~5 B) from
    there, plus 1.5 GB."""
    run = RUNS[(wildcards.sweep, wildcards.run)]
    per_param = 5 if run["num_experts"] >= 4096 else 16
    return int(1500 + run["params"] * per_param / 2**20)


def get_data_check():
    """Real corpora are checked once before any training job (rule check_data)."""
    corpora = {run["corpus"] for run in RUNS.values()}
    return ["results/data.ok"] if corpora - {"synthetic"} else []


def get_data_check_args():
    """The --set arguments of the first run on a real corpus (rule check_data)."""
    for run in RUNS.values():
        if run["corpus"] != "synthetic":
            return set_args(run["overrides"])
    return ""


def get_runs_dir(wildcards, input):
    """results/runs/<sweep>/<run>/summary.json -> results/runs (rule collect)."""
    return str(Path(input[0]).parents[2])


def get_analysis_dir(wildcards, output):
    """The folder `analysis figures --out` writes figures/, tables/ and REPORT.md into."""
    return str(Path(output.report).parent)


# what `analysis figures` writes besides results/figures/<FIGURES>.png|pdf (rule figures)
TABLES = [
    f"results/tables/table{n}.{ext}" for n in (6, 7, 8) for ext in ("md", "csv", "tex")
]


def get_analysis_outputs():
    """The figures and the report (rule all)."""
    return [f"results/figures/{name}.png" for name in FIGURES] + ["results/REPORT.md"]
