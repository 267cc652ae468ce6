# Entry point of the reproduction workflow: `snakemake --cores all`.
# For now it runs the layer benchmark (issue 3); training, tracking and figures join it as they land.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/bench.smk"


rule all:
    default_target: True
    input:
        "results/bench/bench.json",
