# Collection and figures (python -m analysis): the run directories this config plans (only those:
# another config's runs may share results/runs) -> results/summary.csv (+ snapshots.csv,
# expert_load.csv) -> the paper's figures and tables beside its published numbers, results/REPORT.md,
# and an MLflow "analysis" run holding them.


rule collect:
    input:
        get_run_summaries(),
    output:
        summary="results/summary.csv",
        snapshots="results/snapshots.csv",
        loads="results/expert_load.csv",
    log:
        "logs/collect.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    params:
        runs=get_planned_run_dirs,
    shell:
        "python -m analysis collect --runs {params.runs} --out {output.summary} > {log} 2>&1"


rule figures:
    input:
        summary="results/summary.csv",
        snapshots="results/snapshots.csv",
        loads="results/expert_load.csv",
        bench="results/bench/bench.json",
        synced="results/mlflow.synced",
    output:
        figures=report(
            expand("results/figures/{name}.png", name=FIGURES),
            caption="../report/figures.rst",
            category="Figures",
        ),
        pdfs=expand("results/figures/{name}.pdf", name=FIGURES),
        tables=TABLES,
        report="results/REPORT.md",
    log:
        "logs/figures.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    params:
        out=get_analysis_dir,
    shell:
        "python -m analysis figures --summary {input.summary} --bench {input.bench} "
        "--out {params.out} > {log} 2>&1"


# Inside the experts (python -m analysis experts): each MoE run's load heatmap over training with
# its Lorenz curve (results/figures/experts/<sweep>/<run>.png), and per sweep with MoE runs
# results/figures/expert_load_<sweep>.png (dead experts and MaxVio against the experts; the
# balance sweep's heatmaps without and with the balancing losses), each run's figure attached to
# its MLflow run (artifacts under figures/, replaced when drawn again).
rule experts:
    input:
        get_run_summaries(),
        synced="results/mlflow.synced",  # each run's figure goes to its MLflow run too
    output:
        get_expert_figures(),
    log:
        "logs/experts.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    params:
        runs=get_planned_run_dirs,
    shell:
        "python -m analysis experts {params.runs} --out results > {log} 2>&1"
