# Training: one job per (sweep, run); the run directory (moe_impl/runs/rundir.py) is its output, and
# summary.json, written last, marks it finished. `--resume` continues an interrupted run from its
# last checkpoint (and leaves a finished one alone), so a restarted workflow loses no work.
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
    params:
        args=first_real_run_args(),
        train_config=config["train_config"],
    log:
        "logs/check_data.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m moe_impl train --config {params.train_config} {params.args} --check-data "
        "> {log} 2>&1 && touch {output}"


rule train:
    input:
        ready="results/mlflow.ready",
        data=checked_data(),
        train_config=config["train_config"],
    output:
        summary=f"{RUNS_DIR}/{{sweep}}/{{run}}/summary.json",
    params:
        args=train_args,
        out=lambda wildcards: run_dir(wildcards.sweep, wildcards.run),
        launch=LAUNCH,
        gpus=config["gpus_per_run"],
        nodes=config["nodes_per_run"],
        # the job's cores shared by the processes of one node
        process_threads=lambda wildcards, threads: max(1, threads // max(1, config["gpus_per_run"])),
    log:
        "logs/train/{sweep}/{run}.log",
    benchmark:
        "benchmarks/train/{sweep}/{run}.tsv"
    threads: config["threads_per_run"]
    resources:
        mem_mb=train_mem_mb,
        gpu=TRAIN_RESOURCES["gpu"],
        nodes=TRAIN_RESOURCES["nodes"],
        slurm_extra=TRAIN_RESOURCES["slurm_extra"],
        mpi="srun",  # launch.sh starts its own srun across nodes (common.smk, train_resources)
    conda:
        "../envs/moe.yaml"
    shell:
        "bash {params.launch} {params.gpus} {params.nodes} "
        "train --config {input.train_config} {params.args} "
        "--set train.threads={params.process_threads} --out {params.out} --resume > {log} 2>&1"
