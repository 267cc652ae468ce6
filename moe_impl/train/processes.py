"""The processes of one training run: how many the workflow starts (`gpus_per_run` on each of
`nodes_per_run` nodes, workflow/scripts/launch.sh), how SLURM places them, and the rule that they
share each batch's rows evenly (expert parallelism, paper Sec. 3.1: every process holds an equal
share of the batch). The trainer (loop.py) and the workflow (workflow/rules/common.smk) apply the
same rule; torch-free."""

from __future__ import annotations

from collections.abc import Mapping


def per_run(config: Mapping) -> int:
    """Processes of one run of a workflow config: gpus_per_run (at least one) on each node."""
    return max(1, config["gpus_per_run"]) * config["nodes_per_run"]


def named(config: Mapping) -> str:
    """The processes of a workflow config's runs as its keys name them, for a message."""
    return f"gpus_per_run x nodes_per_run = {per_run(config)} processes"


def check_divisible(batch_sizes: Mapping[str, int], processes: int, who: str) -> None:
    """ValueError unless every batch (`{"train.batch_size": rows, ...}`) splits into `processes`
    equal shares of rows; `who` names the processes in the message."""
    for key, rows in batch_sizes.items():
        if rows % processes:
            raise ValueError(
                f"{key}={rows} must be divisible by {who}: each takes an equal share of the rows"
            )


def slurm_resources(config: Mapping) -> dict:
    """SLURM resources of a training job: one node with gpus_per_run GPUs (`gpu`: sbatch --gpus),
    or nodes_per_run whole nodes with gpus_per_run GPUs and one task each (the train rule's `mpi`
    tells the SLURM plugin that launch.sh starts its own srun, so it does not wrap the command in
    `srun -n1`, which would leave one task for the per-node torchruns)."""
    gpus, nodes = config["gpus_per_run"], config["nodes_per_run"]
    if nodes == 1:
        return {"gpu": gpus, "nodes": 1, "slurm_extra": ""}
    return {
        "gpu": 0,  # GPUs per node, below: sbatch --gpus would let SLURM split them unevenly
        "nodes": nodes,
        "slurm_extra": f"--gpus-per-node={gpus} --ntasks-per-node=1 --exclusive",
    }
