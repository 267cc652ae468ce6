# The reproduction: `snakemake --cores all` (config/config.yaml, CPU, minutes to an hour),
# `--configfile config/smoke.yaml` (every step in a few minutes), or `--configfile
# config/paper.yaml --profile profiles/slurm` (the paper's scale on a GPU cluster). Every rule calls
# the package's CLI; the rules only wire files together.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        get_run_summaries(),
        "results/bench/bench.json",
        get_analysis_outputs(),
