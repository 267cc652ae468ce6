"""Gradient accumulation, `train.micro_batches` (moe_impl/train/micro.py, issue 28).

- with the balancing losses, the gate noise and dropout off, m micro-batches give the unsplit
  batch's gradients, loss and routing statistics (flat and hierarchical MoE LMs, an LSTM baseline,
  sparse expert gradients, and an LSTM state carried across steps, split and joined by rows);
- with the losses on, the step's loss is the mean of the micro-batches' (each balancing loss over
  its own micro-batch, Eq. 6-11): m copies of the same rows give one copy's gradients, and two
  different halves the mean of their gradients;
- m = 1 is bit for bit the step as it was before the key (a copy of that step below);
- a run with m = 2 resumes exactly; the config errors; the key at 1 leaves every fingerprint as it
  was.

Unit tier: tiny in-process models; the expert-parallel test spawns two gloo processes
(integration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    HIER_16,
    TINY,
    lm1b_overrides,
    losses,
    make_archive,
    randomise_gates,
    run_until_killed,
    tiny,
)

from moe_impl.data.base import Batch
from moe_impl.model.lm import DenseFFN
from moe_impl.train import checkpoint, micro
from moe_impl.train.config import RunConfig, load_config
from moe_impl.train.corpus import local_batch
from moe_impl.train.identity import differences, fingerprint, identity
from moe_impl.train.loop import Trainer
from moe_impl.train.optim import clip_gradients
from moe_impl.train.schedule import lr_factor, step_seeds

HIER = HIER_16
LSTM = [
    "model.preset=cpu/4xLSTM-64",
    "model.lstm_layers=[[16, null], [16, null]]",
    "model.d_hidden=null",
    "model.num_experts=null",
    "model.k=null",
]
MODELS = {
    "flat": [],
    "flat-sparse": ["model.sparse_grad=true"],
    "hierarchical": HIER,
    "hierarchical-sparse": [*HIER, "model.sparse_grad=true"],
    "lstm": LSTM,
}
EXACT = ["model.w_importance=0", "model.w_load=0", "model.noisy_gating=false", "model.dropout=0"]
CLEAN = ["model.noisy_gating=false", "model.dropout=0"]  # deterministic routing, losses on


def trainer(tmp_path, name: str, *overrides: str) -> Trainer:
    """A TINY trainer whose gates route by x (zero-initialised gates route every token alike)."""
    t = Trainer(tiny(*overrides), tmp_path / name)
    if t.model.moe is not None and not isinstance(t.model.moe, DenseFFN):
        randomise_gates(t.model.moe)
    return t


def tensors(t: Trainer, batch: Batch):
    return local_batch(batch, t.ctx, t.device)


def forward_backward(t: Trainer, batch: Batch):
    """The step's forward and backward passes on `batch` (no update): (loss, aux, scored, stats,
    state) and the gradients, dense."""
    result = t._forward_backward(*tensors(t, batch))
    grads = {
        name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
        for name, p in t.model.named_parameters()
        if p.grad is not None
    }
    t.model.zero_grad(set_to_none=True)
    return result, grads


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=2e-5, atol=1e-7, msg=name)


def rows(batch: Batch, index) -> Batch:
    return Batch(*(None if a is None else a[index] for a in batch))


def tiled(batch: Batch, m: int) -> Batch:
    """m copies of the batch's rows, one after the other."""
    return Batch(*(None if a is None else np.concatenate([a] * m) for a in batch))


# --- (1) the unsplit batch's gradients, losses off ---------------------------------------------


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("model", MODELS)
def test_micro_batches_give_the_whole_batchs_gradients(tmp_path, model, m):
    whole = trainer(tmp_path, "whole", *MODELS[model], *EXACT)
    split = trainer(tmp_path, "split", *MODELS[model], *EXACT, f"train.micro_batches={m}")
    batch = whole.corpus.train_batch(0, 8, 24)
    (loss, aux, scored, stats, _), want = forward_backward(whole, batch)
    (loss_m, aux_m, scored_m, stats_m, _), got = forward_backward(split, batch)
    assert_grads_close(got, want)
    assert loss_m == pytest.approx(loss, rel=1e-6) and aux == aux_m == 0.0
    assert scored_m == scored == float(batch.scored.sum())
    if stats is None:
        assert model == "lstm" and stats_m is None
        return
    # the step's routing: counts summed over the micro-batches are the whole batch's
    assert torch.equal(stats_m.tokens_per_expert, stats.tokens_per_expert)
    assert stats_m.num_dropped == stats.num_dropped == 0
    keys = ("importance", "load", "cv_importance", "cv_load", "max_over_mean_load", "gate_entropy")
    if model == "hierarchical":
        keys += ("primary_gate_entropy", "secondary_gate_entropy")
    for key in keys:
        torch.testing.assert_close(getattr(stats_m, key), getattr(stats, key), msg=key)


@pytest.mark.parametrize("m", [1, 4])
def test_sparse_gradients_are_coalesced_after_every_micro_batch(tmp_path, monkeypatch, m):
    """CUDA's sparse add concatenates (it merges only on CPU): coalesced after each pass, the
    accumulated expert gradient holds each expert once between passes, never m copies."""
    t = trainer(tmp_path, "t", *MODELS["hierarchical-sparse"], *EXACT, f"train.micro_batches={m}")
    calls = []
    real = micro.coalesce_sparse_grads

    def spy(model):
        real(model)
        grads = [p.grad for p in model.parameters() if p.grad is not None and p.grad.is_sparse]
        assert grads and all(g.is_coalesced() for g in grads)
        calls.append(len(grads))

    monkeypatch.setattr(micro, "coalesce_sparse_grads", spy)
    forward_backward(t, t.corpus.train_batch(0, t.cfg.train.batch_size, t.cfg.train.seq_len))
    assert len(calls) == (m if m > 1 else 0)  # m = 1: the step as it always was


def test_the_carried_lstm_state_is_split_and_joined_by_rows(tmp_path):
    """LM1B rows continue across steps: two steps' state and gradients as the unsplit ones'."""
    more = [*lm1b_overrides(make_archive(tmp_path / "data")), "model.softmax_samples=0", *EXACT]
    more += ["train.batch_size=4"]
    whole = trainer(tmp_path, "whole", *more)
    split = trainer(tmp_path, "split", *more, "train.micro_batches=2")
    assert whole.corpus.carries_state
    for step in range(3):
        batch = whole.corpus.train_batch(step, 4, 8)
        (loss, _, _, _, state), want = forward_backward(whole, batch)
        (loss_m, _, _, _, state_m), got = forward_backward(split, batch)
        assert_grads_close(got, want)
        assert loss_m == pytest.approx(loss, rel=1e-6)
        for s, s_m in zip(state, state_m, strict=True):
            for t, t_m in zip(s, s_m, strict=True):
                assert t_m.shape == t.shape and not t_m.requires_grad
                torch.testing.assert_close(t_m, t)
        whole.loop.lstm_state, split.loop.lstm_state = state, state_m  # as train_step does


def test_split_and_join_keep_the_row_order():
    state = [(torch.arange(24.0).view(1, 6, 4), -torch.arange(24.0).view(1, 6, 4))]
    parts = micro.split_state(state, 3)
    assert [p[0][0][0, :, 0].tolist() for p in parts] == [[0, 4], [8, 12], [16, 20]]
    joined = micro.join_state(parts)
    assert all(torch.equal(a, b) for a, b in zip(joined[0], state[0], strict=True))
    assert micro.split_state(None, 2) == [None, None]
    x = torch.arange(6)
    assert [c[0].tolist() for c in micro.split_rows((x,), 3)] == [[0, 1], [2, 3], [4, 5]]


# --- (2) what the balancing losses see: each micro-batch ------------------------------------


@pytest.mark.parametrize("model", ["flat", "hierarchical"])
@pytest.mark.parametrize("m", [2, 4])
def test_m_copies_of_the_same_rows_give_one_copys_gradients(tmp_path, model, m):
    """The step's aux loss is the micro-batches' mean, its NLL the mean over all scored tokens:
    m identical micro-batches give one's loss and gradients (factor 1), not m times the aux."""
    one = trainer(tmp_path, "one", *MODELS[model], *CLEAN, f"train.batch_size={8 // m}")
    copies = trainer(tmp_path, "copies", *MODELS[model], *CLEAN, f"train.micro_batches={m}")
    batch = one.corpus.train_batch(0, 8 // m, 24)
    (loss, aux, scored, _, _), want = forward_backward(one, batch)
    (loss_m, aux_m, scored_m, _, _), got = forward_backward(copies, tiled(batch, m))
    assert aux > 0.01  # the balancing losses are on
    assert aux_m == pytest.approx(aux, rel=1e-6) and loss_m == pytest.approx(loss, rel=1e-6)
    assert scored_m == m * scored
    assert_grads_close(got, want)


@pytest.mark.parametrize("model", ["flat", "hierarchical"])
def test_each_micro_batch_has_its_own_balancing_loss(tmp_path, model):
    """Two different halves: the step's aux loss and gradients are the mean of each half's own
    step (Importance and Load over the half, Eq. 6-11), not those of the whole batch."""
    halves = trainer(tmp_path, "halves", *MODELS[model], *CLEAN, "train.micro_batches=2")
    whole = trainer(tmp_path, "whole", *MODELS[model], *CLEAN)
    half = trainer(tmp_path, "half", *MODELS[model], *CLEAN, "train.batch_size=4")
    batch = halves.corpus.train_batch(0, 8, 24)
    batch = batch._replace(scored=np.ones_like(batch.scored))  # equal halves: a plain mean
    (_, aux_m, _, _, _), got = forward_backward(halves, batch)
    (_, aux_a, _, _, _), grads_a = forward_backward(half, rows(batch, slice(0, 4)))
    (_, aux_b, _, _, _), grads_b = forward_backward(half, rows(batch, slice(4, 8)))
    (_, aux_whole, _, _, _), _ = forward_backward(whole, batch)
    assert aux_m == pytest.approx((aux_a + aux_b) / 2, rel=1e-6)
    assert aux_m != pytest.approx(aux_whole, rel=1e-3)  # the whole batch's losses differ
    assert_grads_close(got, {k: (grads_a[k] + grads_b[k]) / 2 for k in grads_a})


# --- (3) m = 1 is the step as it was ---------------------------------------------------------


def step_before_micro_batches(t: Trainer) -> float:
    """Trainer.train_step's update as it was before train.micro_batches (one process): the loss."""
    train, step = t.cfg.train, t.loop.step
    t.model.train()
    dropout_seed, noise_seed = step_seeds(train.seed, step, 0, False)
    torch.manual_seed(dropout_seed)
    t.generator.manual_seed(noise_seed)
    inputs, targets, scored = tensors(
        t, t.corpus.train_batch(step, train.batch_size, train.seq_len)
    )
    state = t.loop.lstm_state if t.corpus.carries_state else None
    out = t.model(inputs, targets, scored, state=state, generator=t.generator)
    num_scored = max(float(out.num_scored), 1.0)
    share = out.nll_sum.float() / num_scored
    loss = float(out.nll_sum.detach().float()) / num_scored
    (share + out.aux_loss.float()).backward()
    clip_gradients(t.model, train.clip_norm, distributed=False)
    factor = lr_factor(step, train.warmup_steps, train.schedule)
    for opt in t.optimizers:
        for group in opt.param_groups:
            group["lr"] = train.lr * factor
        opt.step()
        opt.zero_grad(set_to_none=True)
    if t.corpus.carries_state:
        t.loop.lstm_state = [tuple(x.detach() for x in s) for s in out.state]
    t.loop.step += 1
    return loss


@pytest.mark.parametrize("case", ["flat-dropout", "hierarchical-sparse", "lm1b"])
def test_one_micro_batch_is_bit_for_bit_the_step_before(tmp_path, case):
    """Noisy gating, dropout, sparse expert gradients, the sampled softmax and a carried state."""
    more = {
        "flat-dropout": ["model.dropout=0.2"],
        "hierarchical-sparse": MODELS["hierarchical-sparse"],
        "lm1b": [*lm1b_overrides(make_archive(tmp_path / "data")), "model.dropout=0.1"],
    }[case]
    now = Trainer(tiny(*more, "train.micro_batches=1"), tmp_path / "now")
    now.run()
    before = Trainer(tiny(*more), tmp_path / "before")
    want = [step_before_micro_batches(before) for _ in range(now.total_steps)]
    assert losses(tmp_path / "now") == want
    for (name, p), q in zip(now.model.named_parameters(), before.model.parameters(), strict=True):
        assert torch.equal(p, q), name


# --- (4) resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["flat", "lm1b"])
def test_a_run_with_micro_batches_resumes_exactly(tmp_path, case):
    """Noise and dropout drawn per micro-batch from the step's seeds; LM1B carries its state."""
    more = ["model.dropout=0.1", "train.micro_batches=2"]
    if case == "lm1b":
        more += [*lm1b_overrides(make_archive(tmp_path / "data")), "train.batch_size=4"]
    cfg = tiny(*more)
    whole = Trainer(cfg, tmp_path / "whole").run()
    run_until_killed(Trainer(cfg, tmp_path / "cut"), at_step=6)
    assert checkpoint.latest(tmp_path / "cut") is not None
    resumed = Trainer(cfg, tmp_path / "cut", resume=True)
    assert 0 < resumed.step < 6
    summary = resumed.run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == whole["steps"]
    assert summary["test_nll"] == whole["test_nll"] and math.isfinite(whole["test_nll"])


def test_the_step_is_a_function_of_its_number(tmp_path):
    """Same config, same losses; the micro-batches draw other noise than the whole batch."""
    a, b = (Trainer(tiny("train.micro_batches=2"), tmp_path / n).run() for n in "ab")
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and a["test_nll"] == b["test_nll"]
    Trainer(tiny(), tmp_path / "m1").run()
    assert losses(tmp_path / "a") != losses(tmp_path / "m1")


# --- (5) the config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.micro_batches=0"], r"^train\.micro_batches must be a positive integer, got 0$"),
        (
            ["train.micro_batches=true"],
            r"train\.micro_batches must be a positive integer, got True",
        ),
        (["train.micro_batches=1.5"], r"train\.micro_batches must be a positive integer, got 1\.5"),
        (
            ["train.micro_batches=3"],
            r"^train\.batch_size=8 must be divisible by train\.micro_batches=3: ",
        ),
    ],
)
def test_bad_micro_batches_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        tiny(*overrides)
    assert "\n" not in str(err.value)


def test_expert_parallel_needs_micro_batches_times_processes_to_divide_the_batch():
    micro.check_micro_batches(8, 2, 4)
    micro.check_micro_batches(12, 3, 2)
    with pytest.raises(
        ValueError,
        match=r"^train\.batch_size=8 must be divisible by train\."
        r"micro_batches x processes \(2 x 3 = 6\): ",
    ) as err:
        micro.check_micro_batches(8, 2, 3)
    assert "\n" not in str(err.value)


def test_the_default_leaves_every_fingerprint_as_it_was():
    """A config written before the key existed (no train.micro_batches) and one with 1 are the
    same run, with the fingerprint they had; 2 is another run, named in the differences."""
    values = tiny().to_dict()
    del values["train"]["micro_batches"]
    old = RunConfig.from_dict(values)
    assert fingerprint(old) == fingerprint(tiny("train.micro_batches=1")) == fingerprint(tiny())
    assert "train.micro_batches" not in identity(tiny())
    assert not differences(old, tiny("train.micro_batches=1"))
    two = tiny("train.micro_batches=2")
    assert fingerprint(two) != fingerprint(old)
    assert differences(old, two) == [("train.micro_batches", 1, 2)]
    assert differences(two, old) == [("train.micro_batches", 2, 1)]
    assert load_config([], [*TINY, "train.micro_batches=2"]).train.micro_batches == 2


# --- expert parallelism ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("model", ["flat", "hierarchical-sparse"])
def test_expert_parallel_micro_batches_match_one_process(tmp_path, model):
    """Two ranks, each splitting its 4 rows in 2 micro-batches: the one-process run's losses
    (balancing losses, noise and dropout off: the same gradients, to rounding)."""
    from parallel_workers import train_run

    from moe_impl.parallel import spawn

    overrides = [*TINY, *MODELS[model], *EXACT]
    Trainer(load_config([], overrides), tmp_path / "single").run()
    spawn(
        train_run, 2, ([*overrides, "train.micro_batches=2"], str(tmp_path / "dist")), timeout_s=240
    )
    got, want = losses(tmp_path / "dist"), losses(tmp_path / "single")
    assert len(got) == len(want) == 12
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
