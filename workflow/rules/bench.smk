# The layer benchmark (python -m moe_impl bench) across the configured expert counts.


rule bench:
    output:
        json="results/bench/bench.json",
        csv="results/bench/bench.csv",
        png="results/bench/bench.png",
    log:
        "logs/bench.log",
    benchmark:
        "benchmarks/bench.tsv"
    conda:
        "../envs/moe.yaml"
    threads: config["bench"].get("threads", 1)
    resources:
        gpu=1 if config["bench"].get("device", "cpu") == "cuda" else 0,
        mem_mb=BENCH_MEM_MB,  # its largest configuration's measured peak (common.smk)
    params:
        experts=",".join(config["bench"]["experts"]),
        tokens=config["bench"]["tokens"],
        device=config["bench"].get("device", "cpu"),
        # the installed peers (moe_impl/bench/peers.py), each beside its own dense FFN
        peers=(
            f"--peers --peers-max-experts {config['bench'].get('peers_max_experts', PEERS_MAX_EXPERTS)}"
            if config["bench"].get("peers", True)
            else ""
        ),
    shell:
        "python -m moe_impl bench --experts {params.experts} --tokens {params.tokens} "
        "--device {params.device} --threads {threads} {params.peers} --out results/bench "
        "> {log} 2>&1"
