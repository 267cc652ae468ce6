"""Build layers and language models directly on the device, fast: parameters are allocated on the
meta device, then materialised where they run and drawn there. ExpertBank's own initialisation
draws every expert on the CPU from seeded chunks (reproducible across shardings), which for the
billions of parameters of 4096+ experts takes longer than the whole check may; for timing, a
device-side draw from the same distributions is equivalent. Gates start at zero (paper App. A),
so routing starts uniformly at random, as in training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.gating import GatingNetwork
from moe_impl.model.lm import MoELanguageModel, log_uniform_log_probs


def on_device(factory: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """`factory()` built on the meta device, materialised on `device` and initialised there."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    done: set[int] = set()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, ExpertBank):
                d_model, d_hidden = sub.w_in.shape[1:]
                sub.w_in.uniform_(-math.sqrt(6.0 / d_model), math.sqrt(6.0 / d_model))
                sub.w_out.uniform_(-math.sqrt(3.0 / d_hidden), math.sqrt(3.0 / d_hidden))
            elif isinstance(sub, GatingNetwork):
                sub.w_gate.zero_()
                sub.w_noise.zero_()
            elif isinstance(sub, MoELanguageModel):
                sub.softmax_weight.normal_(std=sub.cfg.d_model**-0.5)
                sub.proposal_log_probs.copy_(log_uniform_log_probs(sub.cfg.vocab_size))
                done.add(id(sub.softmax_weight))
                continue
            elif hasattr(sub, "reset_parameters"):
                # a method: mypy types it by nn.Module.__getattr__, Tensor | Module
                sub.reset_parameters()  # type: ignore[operator]
            else:
                continue
            done.update(id(p) for p in sub.parameters(recurse=False))
    missed = [name for name, p in module.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"gpu-check: no initialisation for parameters {missed[:5]}")
    return module
