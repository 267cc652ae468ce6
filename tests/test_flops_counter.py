"""The analytic ops/timestep (moe_impl.model.flops) against torch's FlopCounterMode on small built models.

FlopCounterMode counts 2 FLOPs per multiply-add of every matmul, so a model of `tokens` timesteps
must count 2 · tokens · ops_per_timestep (embedding lookup 0, softmax excluded by the definition).
torch's fused CPU LSTM is invisible to the counter, so the LSTM here is written out as one matmul
per step over [x, h] (no biases: the paper's counts have none). The MoE layers are the project's
own, in training mode (the gate then applies both W_g and W_noise, as the definition counts), with
routing where every selected group and expert receives the same number of tokens, so dispatch adds
no padding rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moe_impl import HierarchicalMoE, MoE
from moe_impl.model.config import ModelConfig
from moe_impl.model.flops import ops_per_timestep


class TinyLSTM(nn.Module):
    def __init__(self, d: int, units: int) -> None:
        super().__init__()
        self.units = units
        self.w = nn.Linear(d + units, 4 * units, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        h = c = x_BTD.new_zeros(b, self.units)
        outs = []
        for s in range(t):
            i, f, g, o = self.w(torch.cat([x_BTD[:, s], h], -1)).chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        return torch.stack(outs, 1)


CASES = [  # (moe kwargs for ModelConfig, layer factory)
    (dict(moe="flat", num_experts=4, k=4, d_hidden=8), lambda d: MoE(d, 8, 4, k=4)),
    (
        dict(
            moe="hierarchical",
            num_experts=6,
            num_groups=2,
            group_size=3,
            k_primary=2,
            k_secondary=3,
            d_hidden=8,
        ),
        lambda d: HierarchicalMoE(d, 8, 2, 3, k_primary=2, k_secondary=3),
    ),
]


@pytest.mark.parametrize(("moe_kwargs", "layer_fn"), CASES)
def test_ops_per_timestep_matches_flop_counter(moe_kwargs, layer_fn):
    d, vocab, batch, steps = 16, 50, 3, 5
    cfg = ModelConfig.build(
        name="tiny",
        vocab_size=vocab,
        d_model=d,
        lstm_layers=((d, None), (d, None)),
        softmax_samples=None,
        **moe_kwargs,
    )
    emb, lower, moe, upper = (
        nn.Embedding(vocab, d),
        TinyLSTM(d, d),
        layer_fn(d).train(),
        TinyLSTM(d, d),
    )
    tokens = torch.randint(vocab, (batch, steps))
    with FlopCounterMode(display=False) as counter:
        upper(moe(lower(emb(tokens))).y)
    assert counter.get_total_flops() == 2 * batch * steps * ops_per_timestep(cfg)
