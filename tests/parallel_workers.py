"""Functions the expert-parallel tests run in spawned gloo processes (moe_impl.parallel.spawn).

Each case builds the single-process layer from a seed, so every rank and the parent test hold the
same weights and the same global batch; a rank keeps its slice of the tokens, loads the weights into
the distributed layer and returns its outputs and the whole model's gradients for the parent to
compare with the single-process layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import randomise_gates

from moe_impl import HierarchicalMoE, MoE
from moe_impl.parallel import (
    DistributedHierarchicalMoE,
    DistributedMoE,
    load_full_state_dict,
    sum_replicated_grads,
)
from moe_impl.parallel.shard import gather_rows, shard_of

D_MODEL, D_HIDDEN = 5, 7


def build_single(case: dict) -> torch.nn.Module:
    """The single-process layer of a case, float64, gates randomised so routing depends on x."""
    torch.manual_seed(case["seed"])
    common = dict(noisy_gating=case.get("noisy", True), sparse_grad=case.get("sparse", False))
    if case["kind"] == "flat":
        layer = MoE(D_MODEL, D_HIDDEN, case["experts"], case["k"], **common)
    else:
        layer = HierarchicalMoE(D_MODEL, D_HIDDEN, *case["shape"], *case["k"], **common)
    layer = layer.double()
    randomise_gates(layer, 0.7, seed=case["seed"] + 1)
    with torch.no_grad():
        if case.get("starve"):  # the last `starve` experts (flat) or groups: never chosen
            gate = layer.gate if case["kind"] == "flat" else layer.primary_gate
            gate.w_gate[0, -case["starve"] :] = -50.0  # x[:, 0] >= 1: logits <= -50
            gate.w_noise[0, -case["starve"] :] = -50.0  # noise std ~ 0.01
    layer.train(case.get("train", True))
    return layer


def global_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch x (tokens of every rank, in rank order) and the output weights r."""
    g = torch.Generator().manual_seed(case["seed"] + 2)
    tokens = sum(case["sizes"])
    x = torch.randn((tokens, D_MODEL), generator=g, dtype=torch.float64)
    r = torch.randn((tokens, D_MODEL), generator=g, dtype=torch.float64)
    if case.get("starve"):
        x[:, 0] = x[:, 0].abs() + 1.0
    return x, r


def reference(case: dict) -> dict:
    """The single-process layer on the global batch: y, aux, counts and every gradient."""
    layer = build_single(case)
    x, r = global_inputs(case)
    x.requires_grad_(True)
    out = layer(x, generator=torch.Generator().manual_seed(case["seed"] + 3))
    ((out.y * r).sum() + out.aux_loss).backward()
    grads = {n: _dense(p.grad, p) for n, p in layer.named_parameters()}
    return {
        "y": out.y.detach(),
        "aux": out.aux_loss.detach(),
        "counts": out.stats.tokens_per_expert,
        "entropy": out.stats.entropy_sums,
        "x_grad": x.grad,
        "grads": grads,
    }


def _dense(grad, p):
    if grad is None:
        return torch.zeros_like(p)
    return grad.to_dense() if grad.is_sparse else grad


def distributed_case(rank: int, world: int, case: dict) -> dict:
    """This rank's part of the case, with the whole model's gradients gathered."""
    single = build_single(case)
    cls = DistributedMoE if case["kind"] == "flat" else DistributedHierarchicalMoE
    layer = cls(single.config, replicate_noise=True)
    layer = layer.double()
    load_full_state_dict(layer, single.state_dict())
    layer.train(case.get("train", True))
    if case.get("compile"):  # model.compile: the gates (and combine) through torch.compile
        layer.compile_routing()
    x, r = global_inputs(case)
    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    x_local = x[lo:hi].clone().requires_grad_(True)
    out = layer(x_local, generator=torch.Generator().manual_seed(case["seed"] + 3))
    ((out.y * r[lo:hi]).sum() + out.aux_loss).backward()
    sum_replicated_grads(layer)
    grads = {}
    for name, p in layer.named_parameters():
        g = _dense(p.grad, p)
        shard = shard_of(p)
        grads[name] = g if shard is None else gather_rows(g, shard[1], None)
    return {
        "y": out.y.detach(),
        "aux": out.aux_loss.detach(),
        "counts": out.stats.tokens_per_expert,
        "entropy": out.stats.entropy_sums,
        "x_grad": x_local.grad,
        "grads": grads,
        "world": dist.get_world_size(),
        "compiled": layer.routing_compiled,
    }


def run_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [distributed_case(rank, world, case) for case in cases]


def config_round_trip(rank: int, world: int, configs: list) -> list[dict]:
    """Each MoEConfig's expert-parallel layer, built as `Layer(config)` and by `from_config`
    (with the same seed): their configs, parameter names and whether the weights agree."""
    results = []
    for config in configs:
        cls = DistributedHierarchicalMoE if config.hierarchical else DistributedMoE
        torch.manual_seed(0)
        layer = cls(config)
        torch.manual_seed(0)
        rebuilt = cls.from_config(config, replicate_noise=True)
        state, state_rebuilt = layer.state_dict(), rebuilt.state_dict()
        results.append(
            {
                "config": layer.config,
                "rebuilt_config": rebuilt.config,
                "state_names": list(state),
                "same_state": list(state) == list(state_rebuilt)
                and all(torch.equal(state[n], state_rebuilt[n]) for n in state),
                "replicate_noise": rebuilt.replicate_noise,
            }
        )
    return results


def train_run(rank: int, world: int, overrides: list[str], out: str, resume=False, kill_at=None):
    """`python -m moe_impl train` in this rank: the run's summary (or the step it was killed at)
    and the whole model's weights, gathered from every rank."""
    from helpers import run_until_killed

    from moe_impl.parallel import full_state_dict
    from moe_impl.train.config import load_config
    from moe_impl.train.loop import Trainer

    trainer = Trainer(load_config([], overrides), out, resume=resume)
    if kill_at is not None:  # every rank dies at the same step, as a killed job's processes do
        run_until_killed(trainer, kill_at)
        return {"killed_at": trainer.step}
    summary = trainer.run()
    return {"summary": summary, "weights": full_state_dict(trainer.model)}
