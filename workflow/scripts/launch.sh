#!/usr/bin/env bash
# Start `python -m moe_impl ARGS...` on every GPU a job has (docs/parallel.md):
#   one process                        GPUS_PER_NODE <= 1 and NODES = 1
#   torchrun over the node's GPUs      GPUS_PER_NODE > 1 and NODES = 1
#   one torchrun per node through srun NODES > 1 (inside a SLURM allocation), joined by the c10d
#                                      rendezvous on the allocation's first node
# usage: workflow/scripts/launch.sh GPUS_PER_NODE NODES ARGS...
# (the workflow's train rule and profiles/slurm/train.sbatch both start training through it)
set -euo pipefail
gpus=$1
nodes=$2
shift 2
if [ "$nodes" -gt 1 ]; then
    : "${SLURM_JOB_ID:?NODES > 1 needs a SLURM allocation (sbatch / the slurm profile)}"
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # one task per node with all of the node's CPUs; inside the job's own step (sbatch) or in a
    # job whose rule sets `mpi` (so Snakemake's SLURM plugin does not wrap it in `srun -n1`)
    exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        torchrun --nnodes="$nodes" --nproc_per_node="$(( gpus > 1 ? gpus : 1 ))" \
        --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d \
        --rdzv-endpoint="$head:${MOE_RDZV_PORT:-29500}" -m moe_impl "$@"
elif [ "$gpus" -gt 1 ]; then
    exec torchrun --standalone --nnodes=1 --nproc_per_node="$gpus" -m moe_impl "$@"
else
    exec python -m moe_impl "$@"
fi
