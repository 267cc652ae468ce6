# The reproduction: `snakemake --cores all` (config/config.yaml, CPU, minutes to an hour; `make
# reproduce` adds the machine's free memory as the budget), `--configfile config/smoke.yaml` (every
# step in a few minutes), or `--configfile config/paper.yaml --workflow-profile profiles/slurm` (the
# paper's scale on a GPU cluster). Every rule calls the package's CLI; the rules only wire files
# together.
from snakemake.utils import min_version

min_version("9.0")


# The workflow config is the --configfile named on the command line, all of it: config/config.yaml
# is read only when none is named (Snakemake would merge a named one over it, so a config listing
# fewer sweeps would still run all of config.yaml's). `--config` still overrides single keys.
if not workflow.overwrite_configfiles:

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
