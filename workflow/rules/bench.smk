rule bench:
    output:
        json="results/bench/bench.json",
        csv="results/bench/bench.csv",
        png="results/bench/bench.png",
    params:
        experts=",".join(config["bench"]["experts"]),
        tokens=config["bench"]["tokens"],
    log:
        "logs/bench.log",
    threads: workflow.cores
    shell:
        "python -m moe_impl bench --experts {params.experts} --tokens {params.tokens} "
        "--threads {threads} --out results/bench > {log} 2>&1"
