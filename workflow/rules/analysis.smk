# Collection and figures (python -m analysis): run directories -> results/summary.csv (+
# snapshots.csv, expert_load.csv) -> the paper's figures and tables beside its published numbers,
# results/REPORT.md, and an MLflow "analysis" run holding them.


rule collect:
    input:
        all_summaries(),
    output:
        summary="results/summary.csv",
        snapshots="results/snapshots.csv",
        loads="results/expert_load.csv",
    params:
        # results/runs/<sweep>/<run>/summary.json -> results/runs
        runs=lambda wildcards, input: str(Path(input[0]).parents[2]),
    log:
        "logs/collect.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m analysis collect --runs {params.runs} --out {output.summary} > {log} 2>&1"


rule figures:
    input:
        summary="results/summary.csv",
        snapshots="results/snapshots.csv",
        loads="results/expert_load.csv",
        bench="results/bench/bench.json",
        ready="results/mlflow.ready",
    output:
        figures=[
            report(f"results/figures/{name}.png", caption="../report/figures.rst", category="Figures")
            for name in FIGURES
        ],
        pdfs=[f"results/figures/{name}.pdf" for name in FIGURES],
        tables=TABLES,
        report="results/REPORT.md",
    params:
        out=lambda wildcards, output: str(Path(output.report).parent),
    log:
        "logs/figures.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m analysis figures --summary {input.summary} --bench {input.bench} "
        "--out {params.out} > {log} 2>&1"
