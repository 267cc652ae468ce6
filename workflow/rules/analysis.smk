# Collection and figures (python -m analysis): run directories -> results/summary.csv -> the
# paper's figures and tables beside its published numbers, and results/REPORT.md.

rule collect:
    input:
        all_summaries(),
    output:
        summary="results/summary.csv",
        snapshots="results/snapshots.csv",
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
        bench="results/bench/bench.json",
    output:
        figures=[
            report(f"results/figures/{name}.png", caption="../report/figures.rst", category="Figures")
            for name in FIGURES
        ],
        report="results/REPORT.md",
    log:
        "logs/figures.log",
    localrule: True
    conda:
        "../envs/moe.yaml"
    shell:
        "python -m analysis figures --summary {input.summary} --bench {input.bench} "
        "--out results > {log} 2>&1"
