"""MoELanguageModel against a hand-written forward of the paper's language model (App. C.1).

App. C.1: embedding -> LSTM -> MoE -> LSTM -> softmax. Every layer but the softmax has its output
dropped out (drop with prob p, else scale by 1/(1-p)); after dropout the previous layer's output is
added (residual); the MoE output goes through a sigmoid before its dropout. The baselines swap the
MoE for one always-active FFN (MoE-1-Wide/-Deep), for two more LSTMs (4xLSTM) or drop it with a
projected LSTM (LSTM-2048-512). The reference below reads the model's weights from its state_dict
and recomputes everything token by token: explicit LSTM cell equations (forget gate, optional
output projection, Sak et al. 2014) and the MoE as a loop over tokens and selected experts
(Sec. 2.1: softmax over the top-k gate logits, noise off; App. B: primary x secondary gates).

Shape suffixes: B = batch, T = time steps, D = d_model, V = vocabulary, E = experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_impl.model.lm import MoELanguageModel
from moe_impl.model.presets import ALL_PRESETS, CPU_D_MODEL

B, T = 2, 5
# fmt: off
_CONFIGS = {  # name -> ModelConfig: the cpu presets (d = 64), plus an MoE with projected LSTMs
    name: ALL_PRESETS[name]
    for name in ("cpu/MoE-4", "cpu/MoE-256-h", "cpu/MoE-1-Deep", "cpu/MoE-1-Wide",
                 "cpu/4xLSTM-64", "cpu/LSTM-256-64")
}
_CONFIGS["projected MoE-16-h"] = ALL_PRESETS["cpu/MoE-256-h"].replace(  # MoE-143M's shape
    name="MoE-16-h", num_experts=16, num_groups=4, group_size=4,
    lstm_layers=((4 * CPU_D_MODEL, CPU_D_MODEL),) * 2,
)
# fmt: on
_MOE_CONFIGS = ["cpu/MoE-4", "cpu/MoE-256-h", "projected MoE-16-h"]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


def ref_lstm(x_BTD: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    """One LSTM layer from zero state: gates i, f, g, o (torch's row order of weight_ih)."""
    w_ih, w_hh = sd[prefix + "weight_ih_l0"], sd[prefix + "weight_hh_l0"]
    bias = sd[prefix + "bias_ih_l0"] + sd[prefix + "bias_hh_l0"]
    w_hr = sd.get(prefix + "weight_hr_l0")  # the projection, when there is one
    h = x_BTD.new_zeros(x_BTD.shape[0], w_hh.shape[1])
    c = x_BTD.new_zeros(x_BTD.shape[0], w_ih.shape[0] // 4)
    outs = []
    for t in range(x_BTD.shape[1]):
        i, f, g, o = (x_BTD[:, t] @ w_ih.t() + h @ w_hh.t() + bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.t()
        outs.append(h)
    return torch.stack(outs, dim=1)


def top_k(logits_E: Tensor, k: int) -> tuple[list[int], Tensor]:
    """KeepTopK then softmax (Eq. 3-5 without noise): the kept indices and their gates."""
    idx = torch.argsort(logits_E, descending=True)[:k]
    return idx.tolist(), torch.softmax(logits_E[idx], dim=0)


def ref_moe(x_ND: Tensor, sd: dict[str, Tensor], cfg) -> Tensor:
    """The MoE (or the dense FFN of MoE-1-Wide/-Deep) one token at a time."""
    w_in, w_out = sd.get("moe.experts.w_in"), sd.get("moe.experts.w_out")
    ys = []
    for x in x_ND:
        y = torch.zeros_like(x)
        if cfg.moe == "dense":  # one always-active expert: ReLU after every hidden layer
            y = x
            for j in range(cfg.expert_hidden_layers + 1):
                y = y @ sd[f"moe.linears.{j}.weight"].t()
                if j < cfg.expert_hidden_layers:
                    y = torch.relu(y)
        elif cfg.moe == "flat":
            for e, g in zip(*top_k(x @ sd["moe.gate.w_gate"], cfg.k), strict=True):
                y = y + g * (torch.relu(x @ w_in[e]) @ w_out[e])
        else:  # hierarchical, Eq. 12
            groups = top_k(x @ sd["moe.primary_gate.w_gate"], cfg.k_primary)
            for i, g1 in zip(*groups, strict=True):
                experts = top_k(x @ sd["moe.secondary_gate.w_gate"][i], cfg.k_secondary)
                for j, g2 in zip(*experts, strict=True):
                    e = i * cfg.group_size + j
                    y = y + g1 * g2 * (torch.relu(x @ w_in[e]) @ w_out[e])
        ys.append(y)
    return torch.stack(ys)


def ref_hidden(cfg, sd: dict[str, Tensor], inputs_BT: Tensor, drop=lambda t: t) -> Tensor:
    """App. C.1: out = drop(layer(in)) + in, the embedding without a residual, sigmoid on the
    MoE's output before its dropout; `drop` is applied in layer order."""
    h_BTD = drop(sd["embedding.weight"][inputs_BT])
    for i in range(len(cfg.lstm_layers)):
        h_BTD = h_BTD + drop(ref_lstm(h_BTD, sd, f"lstms.{i}."))
        if i == 0 and cfg.moe != "none":  # the MoE sits between the first and second LSTM
            y_BTD = ref_moe(h_BTD.reshape(-1, cfg.d_model), sd, cfg).view_as(h_BTD)
            h_BTD = h_BTD + drop(torch.sigmoid(y_BTD))
    return h_BTD


class SeededDropout:
    """F.dropout's contract (zero with probability p, else scale by 1/(1-p); identity when not
    training) with the n-th call's mask drawn in logical row-major order from a private generator.
    The model and the reference then get the same masks whatever a tensor's memory layout (torch's
    own dropout fills the mask in memory order, and nn.LSTM's batch-first output is a transposed
    view). Counts the calls that dropped something."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __call__(self, t: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0.0:
            return t
        self.calls += 1
        keep = torch.rand(t.shape, generator=self.generator, dtype=t.dtype) >= p
        return t * keep / (1.0 - p)


def make_model(cfg, p: float, noisy_gating: bool) -> MoELanguageModel:
    """A float64 model whose gates are random (they start at zero, which makes every logit tie)."""
    torch.manual_seed(0)
    model = MoELanguageModel(cfg.replace(dropout=p, noisy_gating=noisy_gating)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "gate" in name:
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * cfg.d_model**-0.5)
    return model


def batch(vocab: int):
    g = torch.Generator().manual_seed(2)
    inputs, targets = torch.randint(vocab, (2, B, T), generator=g)
    return inputs, targets, torch.rand(B, T, generator=g) > 0.3


def ref_log_probs(model, inputs_BT: Tensor, drop=lambda t: t) -> Tensor:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    h_BTD = ref_hidden(model.cfg, sd, inputs_BT, drop)
    return torch.log_softmax(h_BTD @ sd["softmax_weight"].t(), dim=-1)  # no dropout before it


def model_log_probs(model, inputs_BT: Tensor) -> Tensor:
    h_BTD = model.hidden(inputs_BT)[0]
    return torch.log_softmax(h_BTD @ model.softmax_weight.t(), dim=-1)


def nll_sum(log_probs_BTV: Tensor, targets_BT: Tensor, scored_BT: Tensor) -> Tensor:
    return -log_probs_BTV.gather(-1, targets_BT[..., None])[..., 0][scored_BT].sum()


@pytest.mark.parametrize("name", list(_CONFIGS))
@torch.no_grad()
def test_eval_forward_equals_the_app_c1_reference(name):
    """Eval mode: no dropout (the model has p = 0.3) and no gate noise (it has noisy gating)
    anywhere, full softmax over the vocabulary."""
    cfg = _CONFIGS[name]
    model = make_model(cfg, p=0.3, noisy_gating=True).eval()
    inputs, targets, scored = batch(cfg.vocab_size)
    want_BTV = ref_log_probs(model, inputs)
    torch.testing.assert_close(model_log_probs(model, inputs), want_BTV)
    out = model(inputs, targets, scored)
    torch.testing.assert_close(out.nll_sum, nll_sum(want_BTV, targets, scored))
    assert out.num_scored == scored.sum()


@pytest.mark.parametrize("name", _MOE_CONFIGS)
@torch.no_grad()
def test_train_mode_dropout_sits_where_app_c1_puts_it(name, monkeypatch):
    """Train mode, p = 0.5, noise-free gates and full softmax, so dropout is the only randomness.
    With the same masks the model must equal the reference that drops out exactly the embedding,
    each LSTM output and sigmoid(MoE output), in layer order: dropout anywhere else (another
    tensor, before the sigmoid, after the residual add, on the softmax input) or an extra or
    missing dropout changes the masks or the values they hit."""
    cfg = _CONFIGS[name]
    model = make_model(cfg, p=0.5, noisy_gating=False).train()
    inputs, targets, scored = batch(cfg.vocab_size)
    reference = SeededDropout(seed=3)
    want_BTV = ref_log_probs(model, inputs, lambda t: reference(t, 0.5))
    assert reference.calls == len(cfg.lstm_layers) + 2  # embedding, LSTMs, MoE

    fake = SeededDropout(seed=3)
    monkeypatch.setattr(F, "dropout", fake)  # nn.Dropout calls F.dropout
    torch.testing.assert_close(model_log_probs(model, inputs), want_BTV)
    assert fake.calls == reference.calls
    monkeypatch.setattr(F, "dropout", SeededDropout(seed=3))
    got_nll = model(inputs, targets, scored).nll_sum
    torch.testing.assert_close(got_nll, nll_sum(want_BTV, targets, scored))
    assert not torch.allclose(want_BTV, ref_log_probs(model, inputs))  # dropout did act
