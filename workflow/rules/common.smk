# Config validation and the run table: which runs exist, and the `python -m moe_impl train`
# overrides of each (planned by moe_impl/runs/sweeps.py, which tools outside Snakemake call too).
# No rules here: the rules' input functions and params are the get_* helpers below. Every run is checked at parse time through the same code the training uses
# (moe_impl.train.config, called from run_config only), so a bad expert count or key fails before
# any job starts, with a message naming the config entry. Nothing imported here loads torch or
# matplotlib.

import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

from analysis.figures import FIGURES
from moe_impl.bench.spec import parse_experts
from moe_impl.model.flops import total_params
from moe_impl.model.presets import ALL_PRESETS, LM1B_VOCAB
from moe_impl.runs import resources
from moe_impl.runs.sweeps import planned_runs
from moe_impl.train.config import load_config, model_config
from moe_impl.train.identity import changes, describe, fingerprint, set_aside

validate(config, schema="../schemas/config.schema.yaml")

RUNS_DIR = "results/runs"
# starts `python -m moe_impl` on one process, torchrun, or srun + torchrun (gpus_per_run, nodes_per_run)
LAUNCH = str(Path(workflow.basedir) / "workflow" / "scripts" / "launch.sh")


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
    # the corpus fixes the real vocabulary; the estimate is LM1B's on LM1B (any preset: the paper's
    # news100b/ ones there, gpu/ with data_path), else the preset's (made for its corpus)
    vocab = LM1B_VOCAB if cfg.data.corpus == "lm1b" else ALL_PRESETS[preset].vocab_size
    model = model_config(cfg, vocab_size=vocab)
    return {
        "corpus": cfg.data.corpus,
        "batch_size": {"train": cfg.train.batch_size, "eval": cfg.eval.batch_size},
        "params": total_params(model),
        "num_experts": model.num_experts,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,  # get_train_mem_mb
        # what `train` resolves, and a hash of its values (set_aside_changed_runs,
        # get_run_fingerprint)
        "config": cfg,
        "fingerprint": fingerprint(cfg),
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
    """{(sweep, run): {"overrides", "preset", and run_config's keys}} for every run of every
    selected sweep (moe_impl/runs/sweeps.py: `planned_runs`, the same table without Snakemake),
    each checked by the training's config code as it is planned."""
    runs = {}

    def check(run):
        cfg = run_config(run.preset, run.overrides)
        check_divisible(cfg["batch_size"])
        runs[(run.sweep, run.run)] = {
            "overrides": run.overrides,
            "preset": run.preset,
            **cfg,
        }

    planned_runs(config, check=check)
    return runs


RUNS = build_runs()
try:
    BENCH_SPECS = parse_experts(",".join(config["bench"]["experts"]))
except ValueError as err:
    raise ValueError(f"config bench.experts: {err}") from None


# --- memory: each job's mem_mb, and the budget they are held to together -------------------------
# Snakemake starts jobs together only while their mem_mb add up to at most the budget
# (`--resources mem_mb=`: `make reproduce` passes the machine's free memory less a reserve,
# workflow/scripts/mem_budget.py; the default profile has a fixed one). A job's mem_mb is the
# measured peak of what it runs times a margin (workflow/resources/peak_memory.yaml says where each
# measurement comes from), or the analytic estimate where nothing was measured.

PEAK_MEMORY = resources.load(
    resources.PEAK_MEMORY_FILE, Path(workflow.basedir) / "workflow" / "resources"
)
# one expert of the benchmark's layer, 2 x d_model x d_hidden weights at bench's defaults
# (--d-model 64 --d-hidden 128; rule bench passes neither)
BENCH_EXPERT_PARAMS = 2 * 64 * 128


def train_mem_mb(run):
    """moe_impl/runs/resources.py's rule: the preset's measured peak with the margin, else the
    analytic estimate."""
    tokens_per_pass = run["tokens_per_step"] // getattr(
        run["config"].train, "micro_batches", 1
    )
    return resources.train_mem_mb(
        PEAK_MEMORY,
        run["preset"],
        params=run["params"],
        num_experts=run["num_experts"],
        tokens_per_pass=tokens_per_pass,
    ).value


def bench_mem_mb():
    """`bench` measures each --experts entry in a child process beside its parent: the largest
    entry's child plus the parent."""
    estimates = []
    for spec in BENCH_SPECS:
        entry = PEAK_MEMORY["bench"].get(spec.config)
        params = spec.num_experts * BENCH_EXPERT_PARAMS
        analytic = resources.analytic_mem_mb(params, spec.num_experts)
        if entry is None:
            estimates.append(analytic)
            continue
        peak = entry["peak_mib"] + PEAK_MEMORY["bench_parent_mib"]
        measured = resources.measured_mem_mb(peak, PEAK_MEMORY["margin"])
        holds = config["bench"]["tokens"] <= entry["tokens"]
        estimates.append(resources.estimate_mem_mb(measured, holds, analytic))
    return max(estimates)


TRAIN_MEM_MB = {key: train_mem_mb(run) for key, run in RUNS.items()}
BENCH_MEM_MB = bench_mem_mb()


def estimated_mem_mb(job):
    """A job's own estimate: Snakemake lowers a job's mem_mb to the budget when it is more (so
    that such a job still runs, alone), which hides it from job.resources."""
    if job.rule.name == "train":
        return TRAIN_MEM_MB[(job.wildcards.sweep, job.wildcards.run)]
    if job.rule.name == "bench":
        return BENCH_MEM_MB
    return 0


def check_memory_budget(dag):
    """Before any job (onstart, train.smk), warnings: a job to run whose estimate is more than
    the budget runs alone (Snakemake lowers its mem_mb to the budget) and may be killed; a local
    run's budget is more than this machine has free (the default profile's is fixed)."""
    budget = workflow.global_resources.get("mem_mb").value
    if not isinstance(budget, int):
        return
    over = sorted(
        f"{'/'.join(job.wildcards) or job.rule.name} ({estimated_mem_mb(job)} MB)"
        for job in dag.needrun_jobs()
        if estimated_mem_mb(job) > budget
    )
    if over:
        logger.warning(
            f"{', '.join(over)}: more memory than the budget, --resources mem_mb={budget}. "
            "Each will run alone, and may be killed if the machine has less free then; the "
            "estimates are measured peaks with a margin (workflow/resources/peak_memory.yaml). "
            "Leave such runs out of the config (sweeps_to_run, a sweep's models, bench.experts) "
            "or run where more memory is free."
        )
    if not workflow.local_exec:
        return
    script = Path(workflow.basedir) / "workflow" / "scripts" / "mem_budget.py"
    try:
        free = runpy.run_path(str(script))["machine_budget_mb"]()
    except (OSError, ValueError, ImportError):
        return
    if budget > free:
        logger.warning(
            f"The memory budget mem_mb={budget} is more than this machine has free now "
            f"({free} MB after a reserve): jobs started together may be killed. `make "
            f"reproduce` sets it from free memory, or pass --resources mem_mb=$(python {script})."
        )


# --- CUDA: a config that trains on GPUs stops before any job where there is none -----------------
# Checked only when jobs are about to run here (onstart, train.smk: never in a dry run, which plans
# such a config on any machine), through the `python` the jobs run (launch.sh's, the first on
# PATH), so that parsing the workflow never imports torch.

CUDA_PROBE = "import torch; print(torch.cuda.is_available(), torch.__version__)"


def cuda_jobs(dag):
    """The jobs about to run that need a CUDA device: training runs with train.device cuda (or
    cuda:N), and the benchmark with bench.device cuda."""
    jobs = []
    for job in dag.needrun_jobs():
        if job.rule.name == "train":
            cfg = RUNS[(job.wildcards.sweep, job.wildcards.run)]["config"]
            if cfg.train.device.startswith("cuda"):
                jobs.append(job)
        elif (
            job.rule.name == "bench" and config["bench"].get("device", "cpu") == "cuda"
        ):
            jobs.append(job)
    return jobs


def cuda_missing():
    """Why the jobs' `python` cannot use CUDA ("torch 2.13.0+cpu sees none"), or None when it can,
    or when that cannot be told here (no python or no torch on PATH, e.g. with per-rule conda
    environments: each job then stops with its own one-line error)."""
    python = shutil.which("python") or sys.executable
    try:
        proc = subprocess.run(
            [python, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = proc.stdout.split()
    if proc.returncode != 0 or len(words) < 2 or words[-2] == "True":
        return None
    return f"torch {words[-1]} sees none"


def config_names():
    """The workflow config as the user named it: the --configfile paths, else the default."""
    files = workflow.overwrite_configfiles
    if not files:
        return "config/config.yaml"
    return ", ".join(os.path.relpath(f) for f in files)


def check_cuda(dag):
    """Before any job (onstart, train.smk): when jobs about to run on this machine need CUDA and it
    has none, one line and exit 1, nothing started; when it has, a warning if nothing limits how
    many of them share the GPUs (`--resources gpu=N`). A cluster run (--executor slurm, ...) is not
    checked here: its jobs run on the nodes it asks for."""
    if not workflow.local_exec:
        return
    jobs = cuda_jobs(dag)
    if not jobs:
        return
    why = cuda_missing()
    if why is None:
        if len(jobs) > 1 and workflow.global_resources.get("gpu") is None:
            logger.warning(
                f"{len(jobs)} jobs ask for GPUs (resources: gpu) but no --resources gpu=N "
                "limits how many run at once, so several may share a GPU: pass --resources "
                "gpu=<this machine's GPUs> (gpu=1 for one)."
            )
        return
    key = (
        "train.device" if any(j.rule.name == "train" for j in jobs) else "bench.device"
    )
    logger.error(
        f"{config_names()} trains on cuda ({key}=cuda) but this machine has no CUDA device "
        f"({why}); no job was started. Run it where a GPU and a CUDA build of PyTorch are, "
        "or plan it here with `snakemake -n`."
    )
    raise SystemExit(1)


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


def get_run_fingerprint(wildcards):
    """A hash of the run's resolved config values (a param of the train rule); Snakemake
    re-trains a run when it changes, and only then (the config file itself is an `ancient`
    input: an edit that changes no run's values, a comment, re-trains nothing)."""
    return RUNS[(wildcards.sweep, wildcards.run)]["fingerprint"]


def set_aside_changed_runs(dag):
    """Before any job runs (onstart, train.smk): each train job about to run whose run directory
    holds a config with other values has that directory renamed to a hidden sibling
    `.<run>.replaced-<UTC time>` (moe_impl/train/identity.py), whole, before Snakemake removes
    its summary.json; the job then starts a new run. `train --replace-changed` does the same
    when this hook did not run (--no-hooks), without the summary.json Snakemake removed.
    """
    for job in dag.needrun_jobs():
        if job.rule.name != "train":
            continue
        key = (job.wildcards.sweep, job.wildcards.run)
        directory = run_dir(*key)
        try:
            diffs = changes(directory, RUNS[key]["config"])
            why = describe(diffs) if diffs else None
        except ValueError as err:  # an unreadable config.yaml
            why = str(err)
        if why:
            moved = set_aside(directory)
            print(f"{directory}: config changed ({why}); moved the old run to {moved}")


def get_process_threads(wildcards, threads):
    """CPU threads of each process of a run: the job's cores shared by one node's processes."""
    return max(1, threads // max(1, config["gpus_per_run"]))


def get_train_mem_mb(wildcards):
    """The scheduler's memory estimate of a training job (MB): its preset's measured peak with
    the margin, or the analytic estimate (TRAIN_MEM_MB, above)."""
    return TRAIN_MEM_MB[(wildcards.sweep, wildcards.run)]


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
    sweeps = sorted({s for (s, _), run in RUNS.items() if run["num_experts"] > 1})
    return [f"results/figures/expert_load_{sweep}.png" for sweep in sweeps]


def get_analysis_outputs():
    """The figures and the report (rule all), or none when no sweep has a run (empty models)."""
    if not RUNS:
        return []
    figures = [f"results/figures/{name}.png" for name in FIGURES]
    return figures + get_expert_figures() + ["results/REPORT.md"]
