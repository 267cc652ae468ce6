"""Expert parallelism on torch.distributed: the paper's mixed data + model parallelism (§3.1).

- `DistributedMoE`, `DistributedHierarchicalMoE`: drop-ins for `MoE` / `HierarchicalMoE` with the
  experts (groups) sharded over ranks and tokens moved by all_to_all (moe.py, hierarchical.py);
- `sum_replicated_grads`, `global_grad_norm`: the gradient side (sync.py);
- `full_state_dict`, `load_full_state_dict`: between sharded and single-process weights (shard.py);
- `init_from_env` (torchrun) and `spawn` (local gloo processes) (launch.py);
- `meter`: bytes and seconds spent in the collectives (comm.py).
"""

from moe_impl.parallel.comm import CommMeter, meter
from moe_impl.parallel.hierarchical import DistributedHierarchicalMoE
from moe_impl.parallel.launch import DistInfo, init_from_env, spawn
from moe_impl.parallel.moe import DistributedMoE
from moe_impl.parallel.shard import full_state_dict, is_sharded, load_full_state_dict
from moe_impl.parallel.sync import global_grad_norm, sum_replicated_grads

__all__ = [
    "CommMeter",
    "DistInfo",
    "DistributedHierarchicalMoE",
    "DistributedMoE",
    "full_state_dict",
    "global_grad_norm",
    "init_from_env",
    "is_sharded",
    "load_full_state_dict",
    "meter",
    "spawn",
    "sum_replicated_grads",
]
