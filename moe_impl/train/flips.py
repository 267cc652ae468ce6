"""The routing-flip meter (moe_impl/layer/routing_flips.py) on a trained run: its newest checkpoint
(one process's) loaded with the config it carries, evaluated on held-out batches of its own corpus
in its training dtype, without dropout or gate noise, the MoE layer's input measured as it arrives
(a forward pre-hook) at the scored positions only: the tokens perplexity counts, not the padding,
whose repeated inputs would weigh one routing many times. `python -m moe_impl flips` prints it;
gpu-check measures it on the device (moe_impl/gpucheck/gate_precision.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_impl.layer.flat import MoE
from moe_impl.layer.hierarchical import HierarchicalMoE
from moe_impl.layer.routing_flips import FlipCount, count_flips, routing_choices
from moe_impl.model.lm import MoELanguageModel
from moe_impl.train import checkpoint
from moe_impl.train.config import RunConfig
from moe_impl.train.corpus import build_corpus
from moe_impl.train.device import autocast


def load_trained(
    run_dir: Path, device: torch.device
) -> tuple[MoELanguageModel, RunConfig, int, Any]:
    """(the model of the run's newest checkpoint, in eval mode on `device`, the config it carries,
    its step, the run's corpus); ValueError for a run without one, an expert-parallel one or an
    old checkpoint."""
    path = checkpoint.latest(run_dir)
    if path is None:
        raise ValueError(f"--run-dir {str(run_dir)!r} has no complete checkpoint")
    if checkpoint.world_size_of(path) != 1:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by several processes (expert-parallel); the "
            "flip meter reads single-process checkpoints"
        )
    saved = checkpoint.load(path, "cpu")
    if saved.get("config") is None:
        raise ValueError(f"checkpoint {str(path)!r} carries no config (written before they did)")
    cfg = RunConfig.from_dict(saved["config"])
    corpus = build_corpus(cfg)
    model_cfg = cfg.model.resolve(corpus.vocab_size)
    model = MoELanguageModel(model_cfg.replace(sparse_grad=False))  # dense, for load_state_dict
    model.load_state_dict({k: v.to_dense() for k, v in saved["model"].items()})
    return model.to(device).eval(), cfg, int(saved["step"]), corpus


@torch.no_grad()
def measure_run(
    run_dir: Path,
    precisions: list[str],
    device: torch.device,
    *,
    tokens: int | None = None,
    split: str | None = None,
) -> dict:
    """The flips of each precision against float32 on the run's held-out batches (module
    docstring), with what was measured: the model, checkpoint step, tokens and choices."""
    model, cfg, step, corpus = load_trained(run_dir, device)
    layer = model.moe
    if not isinstance(layer, MoE | HierarchicalMoE):
        raise ValueError(f"run {str(run_dir)!r} ({model.cfg.name}) has no MoE layer")
    flips = {p: FlipCount(0, 0) for p in precisions}
    scored_N: list[torch.Tensor] = []  # the batch's scored positions, (B, T) flattened as the MoE's

    def measure(_module, args) -> None:
        x_ND = args[0].reshape(-1, args[0].shape[-1])[scored_N[0]]
        reference = routing_choices(layer, x_ND, "float32")
        for p in precisions:
            flips[p] += count_flips(reference, routing_choices(layer, x_ND, p))

    split = split or cfg.eval.split
    tokens = tokens or cfg.eval.tokens
    hook = layer.register_forward_pre_hook(measure)
    try:
        state = None
        batches = corpus.eval_batches(split, cfg.eval.batch_size, cfg.eval.seq_len, tokens)
        for batch in batches:
            inputs, targets, scored = (
                torch.from_numpy(a).to(device) for a in (batch.inputs, batch.targets, batch.scored)
            )
            scored_N[:] = [scored.reshape(-1)]
            with autocast(device, cfg.train.dtype):
                state = model(inputs, targets, scored, state=state).state
    finally:
        hook.remove()
    choices = next(iter(flips.values())).choices
    return {
        "run_dir": str(run_dir),
        "model": model.cfg.name,
        "step": step,
        "dtype": cfg.train.dtype,
        "device": str(device),
        "split": split,
        "tokens": choices // layer.config.experts_per_token,
        "choices": choices,
        "flips": {p: {"flipped": c.flipped, "share": c.share} for p, c in flips.items()},
    }
