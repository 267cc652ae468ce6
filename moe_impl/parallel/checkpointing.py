"""What each rank of an expert-parallel run writes into a checkpoint, and how a rank reassembles its
state on resume.

Rank 0 writes everything it holds (the replicated layers, their optimizer state, and its shard);
every other rank writes only its sharded parameters and their optimizer state. A checkpoint then
holds each replicated tensor once instead of once per rank (at LM1B scale the embedding and softmax
with Adam's moments are ~10 GB). On resume a rank takes the replicated part from rank 0's file and
its shard from its own. Optimizer states are keyed by parameter index, the same on every rank (the
model is built alike everywhere).
"""

from __future__ import annotations

from torch import nn

from moe_impl.parallel.shard import is_sharded


def _sharded_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if is_sharded(p)}


def _sharded_indices(opt) -> set[int]:
    params = [p for group in opt.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if is_sharded(p)}


def local_state(model: nn.Module, optimizers: list, rank: int) -> tuple[dict, list[dict]]:
    """The model and optimizer states this rank writes."""
    model_state = model.state_dict()
    opt_states = [opt.state_dict() for opt in optimizers]
    if rank == 0:
        return model_state, opt_states
    names = _sharded_names(model)
    model_state = {k: v for k, v in model_state.items() if k in names}
    for opt, state in zip(optimizers, opt_states, strict=True):
        keep = _sharded_indices(opt)
        state["state"] = {i: s for i, s in state["state"].items() if i in keep}
    return model_state, opt_states


def merged_state(
    model: nn.Module, optimizers: list, main: dict, own: dict
) -> tuple[dict, list[dict]]:
    """This rank's model and optimizer states from rank 0's saved payload and its own."""
    names = _sharded_names(model)
    model_state = {k: v for k, v in main["model"].items() if k not in names}
    model_state.update({k: v for k, v in own["model"].items() if k in names})
    opt_states = []
    for opt, main_opt, own_opt in zip(
        optimizers, main["optimizers"], own["optimizers"], strict=True
    ):
        sharded = _sharded_indices(opt)
        state = {i: s for i, s in main_opt["state"].items() if i not in sharded}
        state.update({i: s for i, s in own_opt["state"].items() if i in sharded})
        opt_states.append({**own_opt, "state": state})
    return model_state, opt_states
