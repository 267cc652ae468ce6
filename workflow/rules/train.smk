# Training: one job per (sweep, run); the run directory (moe_impl/rundir.py) is its output, and
# summary.json, written last, marks it finished. `--resume` continues an interrupted run from its
# last checkpoint (and leaves a finished one alone), so a restarted workflow loses no work.


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
    log:
        "logs/train/{sweep}/{run}.log",
    benchmark:
        "benchmarks/train/{sweep}/{run}.tsv"
    threads: config["threads_per_run"]
    resources:
        mem_mb=train_mem_mb,
        gpu=config["gpus_per_run"],
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m moe_impl train --config {input.train_config} {params.args} "
        "--set train.threads={threads} --out {params.out} --resume > {log} 2>&1"
