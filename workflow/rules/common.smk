# The package's run table (moe_impl/train/runtable.py: every run and its `train --set` overrides,
# checked at parse time by the training's own config code, so a bad key fails before any job starts
# naming the config entry), memory estimates (moe_impl/runs/resources.py) and onstart checks
# (moe_impl/train/preflight.py), wired to the rules: no rules here, only the get_* helpers that
# the rules' inputs and params call. Nothing imported here loads torch or matplotlib.

import shlex
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

from analysis.figures import FIGURES
from moe_impl.bench.spec import PEERS_MAX_EXPERTS, parse_experts
from moe_impl.runs import resources
from moe_impl.train import preflight, processes, runtable

validate(config, schema="../schemas/config.schema.yaml")

RUNS_DIR = "results/runs"
BASE = Path(workflow.basedir) / "workflow"
# starts `python -m moe_impl` on one process, torchrun, or srun + torchrun (gpus_per_run, nodes_per_run)
LAUNCH = str(BASE / "scripts" / "launch.sh")
MEM_BUDGET = BASE / "scripts" / "mem_budget.py"  # free memory less a reserve
TRAIN_RESOURCES = processes.slurm_resources(config)  # gpu, nodes, slurm_extra
BENCH_DEVICE = config["bench"].get("device", "cpu")

# Memory: Snakemake starts jobs together only while their mem_mb add up to at most the budget
# (`--resources mem_mb=`: `make reproduce` passes MEM_BUDGET's; the default profile has a fixed
# one). A job's mem_mb is the measured peak of what it runs times a margin (peak_memory.yaml says
# where each measurement comes from), or the analytic estimate where nothing was measured.
PEAKS = resources.load(resources.PEAK_MEMORY_FILE, BASE / "resources")
RUNS = runtable.build_runs(config, PEAKS)  # {(sweep, run): runtable.Run}
try:
    BENCH_SPECS = parse_experts(",".join(config["bench"]["experts"]))
except ValueError as err:
    raise ValueError(f"config bench.experts: {err}") from None
# `bench` measures each entry in a child process beside its parent: the largest one's and the parent
BENCH_MEM_MB = resources.bench_mem_mb(PEAKS, BENCH_SPECS, config["bench"]["tokens"])


def get_run(wildcards):
    """The resolved run of a train job (runtable.Run)."""
    return RUNS[(wildcards.sweep, wildcards.run)]


def set_args(overrides):
    """`python -m moe_impl train` arguments for these overrides, shell-quoted."""
    return " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def preflight_checks(dag):
    """Before any job of a real run (onstart, train.smk): a local run whose jobs need CUDA stops
    where there is none, one line and exit 1; warnings about GPU sharing and memory; the run
    directories whose config changed set aside (moe_impl/train/preflight.py)."""
    jobs = [
        (job.rule.name, get_run(job.wildcards) if job.rule.name == "train" else None)
        for job in dag.needrun_jobs()
    ]
    local, limits, warnings = workflow.local_exec, workflow.global_resources, []
    configs = preflight.config_names(workflow.overwrite_configfiles)
    try:
        if local:  # a cluster run's jobs run on the nodes it asks for
            gpu_limited = limits.get("gpu") is not None
            warnings = preflight.check_cuda(jobs, BENCH_DEVICE, gpu_limited, configs)
    except preflight.Refused as err:
        logger.error(str(err))
        raise SystemExit(1)
    budget = limits.get("mem_mb").value
    if isinstance(budget, int):
        free = preflight.machine_free_mb(MEM_BUDGET) if local else None
        warnings += preflight.check_memory(
            jobs, bench_mem_mb=BENCH_MEM_MB, budget=budget, free=free, script=MEM_BUDGET
        )
    for warning in warnings:
        logger.warning(warning)
    for moved in preflight.set_aside_changed_runs(jobs, RUNS_DIR):
        print(moved)


def get_run_summaries():
    """Every run's summary.json (rules all, collect)."""
    return [f"{RUNS_DIR}/{s}/{r}/summary.json" for s, r in RUNS]


def get_run_dir(wildcards):
    """The run directory `train --out` writes (rule train)."""
    return f"{RUNS_DIR}/{wildcards.sweep}/{wildcards.run}"


def get_train_args(wildcards):
    """The --set arguments of one run (rule train)."""
    return set_args(get_run(wildcards).overrides)


def get_run_fingerprint(wildcards):
    """A hash of the run's resolved config values (a param of the train rule); Snakemake
    re-trains a run when it changes, and only then (the config file itself is an `ancient`
    input: an edit that changes no run's values, a comment, re-trains nothing)."""
    return get_run(wildcards).fingerprint


def get_process_threads(wildcards, threads):
    """CPU threads of each process of a run: the job's cores shared by one node's processes."""
    return max(1, threads // max(1, config["gpus_per_run"]))


def get_train_mem_mb(wildcards):
    """The scheduler's memory estimate of a training job (MB, runtable.Run.mem_mb)."""
    return get_run(wildcards).mem_mb


def get_data_check():
    """Real corpora are checked once before any training job (rule check_data)."""
    corpora = {run.corpus for run in RUNS.values()}
    return ["results/data.ok"] if corpora - {"synthetic"} else []


def get_data_check_args():
    """The --set arguments of the first run on a real corpus (rule check_data)."""
    real = [run for run in RUNS.values() if run.corpus != "synthetic"]
    return set_args(real[0].overrides) if real else ""


def get_planned_run_dirs(wildcards, input):
    """The run directories of this config's runs, from the summary.json files among the inputs
    (rules collect, tracking_sync): exactly these, never another config's runs that share
    results/runs."""
    summaries = [Path(f) for f in input if Path(f).name == "summary.json"]
    return " ".join(shlex.quote(str(summary.parent)) for summary in summaries)


def get_analysis_dir(wildcards, output):
    """The folder `analysis figures --out` writes figures/, tables/ and REPORT.md into."""
    return str(Path(output.report).parent)


# what `analysis figures` writes besides results/figures/<FIGURES>.png|pdf (rule figures)
TABLES = [
    f"results/tables/table{n}.{ext}" for n in (6, 7, 8) for ext in ("md", "csv", "tex")
]


def get_expert_figures():
    """results/figures/expert_load_<sweep>.png of each sweep with an MoE run (rule experts)."""
    sweeps = sorted({run.sweep for run in RUNS.values() if run.num_experts > 1})
    return [f"results/figures/expert_load_{sweep}.png" for sweep in sweeps]


def get_analysis_outputs():
    """The figures and the report (rule all), or none when no sweep has a run (empty models)."""
    if not RUNS:
        return []
    figures = [f"results/figures/{name}.png" for name in FIGURES]
    return figures + get_expert_figures() + ["results/REPORT.md"]
