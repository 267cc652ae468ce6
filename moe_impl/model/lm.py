"""The paper's LSTM-MoE language model and its compute-matched baselines (App. C.1, C.2).

    embedding -> LSTM -> MoE -> LSTM ... -> softmax

Every layer's output gets dropout, then the previous layer's output is added (App. C.1: "After
dropout, the output of the previous layer is added to the layer output"); the MoE output passes
through a sigmoid first. The MoE is applied convolutionally: the lower LSTM runs over all time steps,
then the MoE sees all B·T positions as one batch (Sec. 3.1). Input embedding and softmax weights are
separate (untied), as the paper's total parameter counts imply (App. C.1, Table 7).

Everything about the model comes from one `ModelConfig` (moe_impl/model/config.py), so the model
and the accounting describe the same thing: without a layer ('none') it stacks the LSTMs
(4xLSTM-512, LSTM-2048-512, ...); a `DenseConfig` puts one always-active FFN where the MoE goes
(MoE-1-Wide, MoE-1-Deep); a `MoEConfig` builds the flat or hierarchical MoE layer from it as it is. Biases: the
LSTMs keep torch's (the paper's counts leave them out); experts, FFN and softmax have none.

Shape suffixes: B = batch, T = time steps, D = d_model, V = vocabulary, S = softmax samples.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_impl.layer.config import MoEConfig
from moe_impl.layer.flat import MoE, RoutingStats
from moe_impl.layer.hierarchical import HierarchicalMoE
from moe_impl.model.config import DenseConfig, ModelConfig


class LMOutput(NamedTuple):
    nll_sum: Tensor  # Σ over scored targets of −log p (full softmax, or its sampled estimate)
    num_scored: Tensor  # number of scored targets
    aux_loss: Tensor  # the MoE's balancing loss (0 without an MoE)
    stats: RoutingStats | None
    state: list  # each LSTM's (h, c), for truncated back-propagation across batches


class DenseFFN(nn.Module):
    """The always-active "expert" of MoE-1-Wide (one hidden layer) and MoE-1-Deep (several)."""

    def __init__(self, d_model: int, d_hidden: int, hidden_layers: int) -> None:
        super().__init__()
        sizes = [d_model] + [d_hidden] * hidden_layers + [d_model]
        self.linears = nn.ModuleList(
            nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(sizes)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.linears) - 1:
                x = torch.relu(x)
        return x


def log_uniform_log_probs(vocab_size: int) -> Tensor:
    """log Q(w) of the log-uniform (Zipfian) proposal, Q(w) = log((w+2)/(w+1)) / log(V+1), for ids
    ranked by frequency (the LM1B vocabulary file is; so are the synthetic corpus's words)."""
    w = torch.arange(vocab_size, dtype=torch.float64)
    return (torch.log1p(1.0 / (w + 1.0)) / math.log(vocab_size + 1.0)).log().float()


class MoELanguageModel(nn.Module):
    """LSTM LM of App. C with the MoE (or a baseline layer) after the first LSTM.

    forward(inputs_BT, targets_BT, scored_BT, state=None, generator=None) returns an LMOutput. In
    training with `cfg.softmax_samples` set, the loss uses the importance-sampled softmax (samples
    shared by the batch, drawn from `proposal_log_probs`, log-uniform by default); in evaluation, or
    with softmax_samples None or 0, the full softmax. `expert_parallel=True` (inside an initialised
    torch.distributed process group) builds the MoE as DistributedMoE / DistributedHierarchicalMoE:
    every other layer is replicated, and each rank passes its own rows of the batch.
    """

    proposal_log_probs: Tensor  # a buffer (registered in __init__)

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        proposal_log_probs: Tensor | None = None,
        expert_parallel: bool = False,
        replicate_noise: bool = False,
    ) -> None:
        super().__init__()
        if cfg.layer is not None and len(cfg.lstm_layers) < 1:
            raise ValueError(f"model {cfg.name!r}: an MoE needs an LSTM before it")
        self.cfg = cfg
        d, v = cfg.d_model, cfg.vocab_size
        self.embedding = nn.Embedding(v, d)
        self.lstms = nn.ModuleList(
            nn.LSTM(d, units, batch_first=True, proj_size=projection or 0)
            for units, projection in cfg.lstm_layers
        )
        layer = cfg.layer
        self.moe: nn.Module | None = None
        if isinstance(layer, MoEConfig) and expert_parallel:  # experts sharded over the ranks
            from moe_impl.parallel import DistributedHierarchicalMoE, DistributedMoE

            cls = DistributedHierarchicalMoE if layer.hierarchical else DistributedMoE
            self.moe = cls(layer, replicate_noise=replicate_noise)
        elif isinstance(layer, MoEConfig):
            self.moe = (HierarchicalMoE if layer.hierarchical else MoE)(layer)
        elif isinstance(layer, DenseConfig):
            self.moe = DenseFFN(d, layer.d_hidden, layer.hidden_layers)
        self.softmax_weight = nn.Parameter(torch.empty(v, d))
        nn.init.normal_(self.softmax_weight, std=d**-0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        if proposal_log_probs is None:
            proposal_log_probs = log_uniform_log_probs(v)
        if proposal_log_probs.shape != (v,):
            raise ValueError(f"proposal_log_probs must have shape ({v},)")
        self.register_buffer("proposal_log_probs", proposal_log_probs, persistent=False)

    def hidden(self, inputs_BT: Tensor, state: list | None = None, generator=None):
        """The last layer's output (B, T, D), the aux loss, routing stats and the new LSTM states."""
        h_BTD = self.dropout(self.embedding(inputs_BT))
        state = state or [None] * len(self.lstms)
        new_state, aux, stats = [], h_BTD.new_zeros(()), None
        for i, lstm in enumerate(self.lstms):
            out_BTD, s = lstm(h_BTD, state[i])
            new_state.append(s)
            h_BTD = h_BTD + self.dropout(out_BTD)
            if i == 0 and self.moe is not None:
                if isinstance(self.moe, DenseFFN):
                    y_BTD = self.moe(h_BTD)
                else:
                    moe_out = self.moe(h_BTD, generator=generator)
                    y_BTD, aux, stats = moe_out.y, moe_out.aux_loss, moe_out.stats
                h_BTD = h_BTD + self.dropout(torch.sigmoid(y_BTD))
        return h_BTD, aux, stats, new_state

    def forward(self, inputs_BT, targets_BT, scored_BT, state=None, generator=None) -> LMOutput:
        h_BTD, aux, stats, new_state = self.hidden(inputs_BT, state, generator)
        h_ND, y_N = h_BTD[scored_BT], targets_BT[scored_BT]
        samples = self.cfg.softmax_samples
        if self.training and samples:
            nll = self.sampled_nll(h_ND, y_N, samples, generator)
        else:
            nll = F.cross_entropy(h_ND @ self.softmax_weight.t(), y_N, reduction="none")
        return LMOutput(nll.sum(), scored_BT.sum(), aux, stats, new_state)

    def sampled_nll(self, h_ND: Tensor, y_N: Tensor, num_samples: int, generator=None) -> Tensor:
        """−log p(y) with the partition function estimated by importance sampling:
        Z ≈ exp(l_y) + Σ_{s ≠ y} exp(l_s) / (S·Q(s)), S samples from Q shared by the batch; it tends
        to the full softmax's −log p(y) as S grows (Jean et al. 2015; paper App. C.1)."""
        log_q_V = self.proposal_log_probs
        sample_S = torch.multinomial(
            log_q_V.exp(), num_samples, replacement=True, generator=generator
        )
        true_N = (h_ND * self.softmax_weight[y_N]).sum(-1)
        sampled_NS = h_ND @ self.softmax_weight[sample_S].t()
        sampled_NS = sampled_NS - (math.log(num_samples) + log_q_V[sample_S])
        sampled_NS = sampled_NS.masked_fill(sample_S[None, :] == y_N[:, None], float("-inf"))
        return torch.logsumexp(torch.cat([true_N[:, None], sampled_NS], 1), 1) - true_N
