"""The LSTM-MoE language model: every preset kind builds, trains and counts as flops.py says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_impl.model.config import ModelConfig
from moe_impl.model.flops import total_params
from moe_impl.model.lm import MoELanguageModel

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

V, D = 50, 16
LSTM2 = ((D, None), (D, None))
KINDS = {
    "flat": dict(lstm_layers=LSTM2, moe="flat", num_experts=8, k=2, d_hidden=12),
    "hierarchical": dict(
        lstm_layers=LSTM2,
        moe="hierarchical",
        num_experts=12,
        num_groups=3,
        group_size=4,
        k_primary=2,
        k_secondary=2,
        d_hidden=12,
    ),
    "wide": dict(lstm_layers=LSTM2, moe="dense", num_experts=1, d_hidden=24),
    "deep": dict(lstm_layers=LSTM2, moe="dense", num_experts=1, d_hidden=8, expert_hidden_layers=4),
    "4xlstm": dict(lstm_layers=LSTM2 * 2),
    "projected": dict(lstm_layers=((32, D),)),
}


def config(kind: str, samples: int | None = None) -> ModelConfig:
    return ModelConfig.build(
        name=kind, vocab_size=V, d_model=D, softmax_samples=samples, **KINDS[kind]
    )


def batch(b: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(V, (b, t), generator=g)
    targets = torch.randint(V, (b, t), generator=g)
    scored = torch.rand(b, t, generator=g) > 0.2
    return inputs, targets, scored


@pytest.mark.parametrize("kind", list(KINDS))
def test_builds_trains_and_counts_like_the_accounting(kind):
    cfg = config(kind, samples=10)
    model = MoELanguageModel(cfg).train()
    out = model(*batch(), generator=torch.Generator().manual_seed(1))
    assert out.nll_sum.dim() == 0 and torch.isfinite(out.nll_sum)
    (out.nll_sum / out.num_scored + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    lstm_biases = sum(p.numel() for n, p in model.named_parameters() if "bias" in n)
    assert sum(p.numel() for p in model.parameters()) - lstm_biases == total_params(cfg)


def test_eval_uses_the_full_softmax_and_is_deterministic():
    model = MoELanguageModel(config("flat", samples=5).replace(dropout=0.3)).eval()
    inputs, targets, scored = batch()
    a, b = model(inputs, targets, scored), model(inputs, targets, scored)
    assert torch.equal(a.nll_sum, b.nll_sum)
    h = model.hidden(inputs)[0]
    want = F.cross_entropy(h[scored] @ model.softmax_weight.t(), targets[scored], reduction="sum")
    torch.testing.assert_close(a.nll_sum, want)


def test_sampled_softmax_converges_to_the_full_softmax():
    torch.manual_seed(0)
    model = MoELanguageModel(config("4xlstm"))
    h = torch.randn(64, D)
    y = torch.randint(V, (64,))
    full = F.cross_entropy(h @ model.softmax_weight.t(), y)
    errors = []
    for samples in (20, 200, 2000, 20000):
        g = torch.Generator().manual_seed(samples)
        errors.append((model.sampled_nll(h, y, samples, g).mean() - full).abs().item())
    assert errors[-1] < 0.01 and errors[-1] < errors[0]


def token_log_likelihoods(model, inputs_BT, targets_BT, state=None):
    """log p(target) at every position with the full softmax, and the LSTM states after the chunk."""
    h_BTD, _, _, new_state = model.hidden(inputs_BT, state)
    log_probs_BTV = torch.log_softmax(h_BTD @ model.softmax_weight.t(), dim=-1)
    return log_probs_BTV.gather(-1, targets_BT[..., None])[..., 0], new_state


@pytest.mark.parametrize("kind", ["hierarchical", "projected"])
@torch.no_grad()
def test_carried_state_continues_the_sequence_exactly(kind):
    """Truncated BPTT across batches: a sequence run as two chunks, the second starting from the
    first's LSTM states, scores every position exactly as the whole sequence in one call (eval mode:
    no dropout, noise-free gates, full softmax; float64)."""
    torch.manual_seed(0)
    model = MoELanguageModel(config(kind)).double().eval()
    for name, w in model.named_parameters():
        if "gate" in name:  # zero at init: every gate logit would tie
            w.normal_(std=D**-0.5)
    inputs, targets, scored = batch(t=9)
    whole_BT, whole_state = token_log_likelihoods(model, inputs, targets)
    first_BT, state = token_log_likelihoods(model, inputs[:, :4], targets[:, :4])
    second_BT, end_state = token_log_likelihoods(model, inputs[:, 4:], targets[:, 4:], state)
    torch.testing.assert_close(torch.cat([first_BT, second_BT], 1), whole_BT)
    torch.testing.assert_close(end_state, whole_state)
    fresh_BT, _ = token_log_likelihoods(model, inputs[:, 4:], targets[:, 4:])
    assert not torch.allclose(fresh_BT, second_BT)  # the state matters

    # forward() passes the state the same way: its NLL sums add up to the whole sequence's.
    first = model(inputs[:, :4], targets[:, :4], scored[:, :4])
    second = model(inputs[:, 4:], targets[:, 4:], scored[:, 4:], state=first.state)
    whole = model(inputs, targets, scored)
    torch.testing.assert_close(first.nll_sum + second.nll_sum, whole.nll_sum)
    torch.testing.assert_close(whole.nll_sum, -whole_BT[scored].sum())
    torch.testing.assert_close(second.state, whole.state)


def test_bad_dropout_names_the_field():
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\), got 1.0"):
        config("flat").replace(dropout=1.0)


def test_a_tiny_run_on_the_synthetic_corpus_lowers_the_loss():
    """Model + corpus + optimizers together: 60 steps of Adam (and FactoredAdam for the experts)."""
    from moe_impl.data import TopicMarkov, TopicMarkovConfig
    from moe_impl.train.optim import FactoredAdam

    torch.manual_seed(0)
    data_cfg = TopicMarkovConfig(vocab_size=40, num_topics=4, fanout=2, eos_prob=0.1, max_len=30)
    corpus = TopicMarkov(data_cfg)
    cfg = ModelConfig.build(
        name="tiny",
        vocab_size=data_cfg.num_tokens,
        d_model=D,
        softmax_samples=None,
        **KINDS["flat"],
    )
    model = MoELanguageModel(cfg).train()
    experts = [model.moe.experts.w_in, model.moe.experts.w_out]
    rest = [p for n, p in model.named_parameters() if not n.startswith("moe.experts")]
    opts = [FactoredAdam(experts, lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]
    losses = []
    for step in range(60):
        b = corpus.train_batch(step, batch_size=8, seq_len=48)
        inputs, targets, scored = (torch.from_numpy(a) for a in b[:3])
        out = model(inputs, targets, scored)
        loss = out.nll_sum / out.num_scored
        (loss + out.aux_loss).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    floor = corpus.floor_nats()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # from ~ln V toward the floor
    assert min(losses) > floor - 0.3  # a sample's NLL can dip below the floor, not far
