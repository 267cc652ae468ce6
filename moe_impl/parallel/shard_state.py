"""What each rank of an expert-parallel run writes into a checkpoint, and how a rank reassembles its
state on resume.

Rank 0 writes everything it holds (the replicated layers, their optimizer state, and its shard);
every other rank writes only its sharded parameters and their optimizer state. A checkpoint then
holds each replicated tensor once instead of once per rank (at LM1B scale the embedding and softmax
with Adam's moments are ~10 GB). On resume a rank takes the replicated part from rank 0's file and
its shard from its own. Optimizer states are keyed by parameter index, the same on every rank (the
model is built alike everywhere). A checkpoint written by another number of processes (or by one)
is resharded: every old file is read and each rank cuts out its rows (`resharded_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_impl.parallel.shard import is_sharded, shard_of


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


def resharded_state(
    model: nn.Module, optimizers: list, saved: list[dict], rank: int, world: int
) -> tuple[dict, list[dict], list | None]:
    """This rank's model state, optimizer states and carried LSTM state from a checkpoint written by
    another number of processes; `saved` holds the old ranks' payloads in rank order (one for a
    single-process checkpoint). Parameters the old run sharded, and their optimizer states row by
    row, are joined over the old ranks; parameters this run shards are cut at this rank's rows; the
    replicated rest is old rank 0's. The LSTM state (batch rows on dim 1) is joined and cut at this
    rank's share of the rows."""
    main = saved[0]
    # old ranks other than 0 wrote exactly the parameters the old run sharded
    old_sharded = set(saved[1]["model"]) if len(saved) > 1 else set()
    names = {id(p): n for n, p in model.named_parameters()}
    model_state = dict(main["model"])
    for name, p in model.named_parameters():
        whole = main["model"][name]
        if name in old_sharded:
            whole = torch.cat([s["model"][name] for s in saved])
        model_state[name] = _rows_of(whole, p)
    opt_states = []
    for o, (opt, main_opt) in enumerate(zip(optimizers, main["optimizers"], strict=True)):
        plist = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for i, p in enumerate(plist):
            name = names[id(p)]
            sources = saved if name in old_sharded else saved[:1]
            per_rank = [s["optimizers"][o]["state"].get(i) for s in sources]
            if any(st is not None for st in per_rank):
                old_rows = [s["model"][name].shape[0] for s in sources]
                state[i] = _reshard_param_state(per_rank, old_rows, p)
        opt_states.append({**main_opt, "state": state})
    lstm = None
    if main["state"] is not None:
        lstm = []
        for layer in range(len(main["state"])):
            h_c = [torch.cat([s["state"][layer][j] for s in saved], dim=1) for j in range(2)]
            rows = h_c[0].shape[1] // world
            lstm.append(tuple(t[:, rank * rows : (rank + 1) * rows] for t in h_c))
    return model_state, opt_states, lstm


def _rows_of(whole: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """The rows of a whole tensor that parameter `p` holds (all of them unless p is sharded)."""
    if not is_sharded(p):
        return whole
    shard = shard_of(p)
    assert shard is not None  # is_sharded(p)
    first = shard[0]
    return whole[first : first + p.shape[0]]


def _reshard_param_state(per_rank: list, old_rows: list[int], p: nn.Parameter) -> dict:
    """Row tensors (Adam's moments, FactoredAdam's per-expert state) joined over the old ranks and
    cut; scalars (Adam's step) from the first old rank that has them. An old rank that never
    stepped the parameter contributes zero state for its rows."""
    template = next(st for st in per_rank if st is not None)
    out = {}
    for key, value in template.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
            continue
        parts = [
            st[key] if st is not None else value.new_zeros((rows, *value.shape[1:]))
            for st, rows in zip(per_rank, old_rows, strict=True)
        ]
        out[key] = _rows_of(torch.cat(parts), p)
    return out


def state_to_param_devices(opt) -> None:
    """Every optimizer state tensor with rows on its parameter's device. Optimizer.load_state_dict
    leaves a key named "step" where it was loaded (the CPU when resharding), which suits torch's
    scalar steps but not FactoredAdam's per-expert step vector."""
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != p.device:
                state[key] = value.to(p.device)
