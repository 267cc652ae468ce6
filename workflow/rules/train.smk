# Training: one job per (sweep, run); the run directory (moe_impl/runs/rundir.py) is its output, and
# summary.json, written last, marks it finished. `--resume` continues an interrupted run from its
# last checkpoint (and leaves a finished one alone), so a restarted workflow loses no work.
# A run is its config's values: the rule records their hash (get_run_fingerprint), so an edit of
# the training config re-trains exactly the runs whose values changed; their old run directories
# are renamed to hidden `.<run>.replaced-<UTC time>` siblings, whole, before the jobs start
# (preflight_checks, or `train --replace-changed` without hooks). docs/workflow.md says why.
# With gpus_per_run > 1 or nodes_per_run > 1 a run is expert-parallel: workflow/scripts/launch.sh
# starts it with torchrun (one node) or srun + torchrun (several nodes, SLURM).


rule tracking_init:
    output:
        "results/mlflow.ready",
    log:
        "logs/tracking_init.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m moe_impl tracking init > {log} 2>&1 && touch {output}"


rule check_data:
    output:
        "results/data.ok",
    log:
        "logs/check_data.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    params:
        args=get_data_check_args(),
        train_config=config["train_config"],
    shell:
        "python -m moe_impl train --config {params.train_config} {params.args} --check-data "
        "> {log} 2>&1 && touch {output}"


rule train:
    input:
        ready="results/mlflow.ready",
        data=get_data_check(),
        # its content counts through `fingerprint`, not its modification time
        train_config=ancient(config["train_config"]),
    output:
        summary=f"{RUNS_DIR}/{{sweep}}/{{run}}/summary.json",
    log:
        "logs/train/{sweep}/{run}.log",
    benchmark:
        "benchmarks/train/{sweep}/{run}.tsv"
    conda:
        "../envs/moe.yaml"
    threads: config["threads_per_run"]
    resources:
        mem_mb=get_train_mem_mb,
        gpu=TRAIN_RESOURCES["gpu"],
        nodes=TRAIN_RESOURCES["nodes"],
        slurm_extra=TRAIN_RESOURCES["slurm_extra"],
        mpi="srun",  # launch.sh starts its own srun across nodes (moe_impl/train/processes.py)
    params:
        args=get_train_args,
        out=get_run_dir,
        launch=LAUNCH,
        gpus=config["gpus_per_run"],
        nodes=config["nodes_per_run"],
        process_threads=get_process_threads,
        fingerprint=get_run_fingerprint,
    shell:
        "bash {params.launch} {params.gpus} {params.nodes} "
        "train --config {input.train_config} {params.args} "
        "--set train.threads={params.process_threads} --out {params.out} --resume "
        "--replace-changed > {log} 2>&1"


# The MLflow store is a view of the run directories: once this config's runs are done, whatever a
# store lacks (deleted or emptied mid-workflow, a live run that lost its server) is imported from
# them (`tracking sync`: idempotent; a store that cannot be updated is a warning, not a failure).
rule tracking_sync:
    input:
        get_run_summaries(),
        ready="results/mlflow.ready",
    output:
        "results/mlflow.synced",
    log:
        "logs/tracking_sync.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    params:
        runs=get_planned_run_dirs,
    shell:
        "python -m moe_impl tracking sync {params.runs} > {log} 2>&1 && touch {output}"


# one onstart handler per workflow (a second would replace this one), run before any job of a real
# run (never in a dry run): preflight_checks (common.smk) stops a run that needs CUDA on a machine
# without it, before anything is touched, warns about memory, and sets changed runs aside
onstart:
    preflight_checks(workflow.dag)
