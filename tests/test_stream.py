"""Token-stream windows: every eval target scored once, training rows continue and wrap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe_impl.data.stream import (
    count_scored,
    eval_windows,
    train_steps_per_epoch,
    train_windows,
)

_EVAL_CASES = [  # (stream length N, batch_size, seq_len)
    (2, 1, 1),
    (2, 3, 4),
    (50, 1, 7),
    (50, 4, 5),
    (51, 7, 3),
    (101, 10, 10),
    (97, 3, 64),
    (10, 16, 2),
]


def _scored_targets(batches) -> list[int]:
    return [int(t) for b in batches for t in b.targets[b.scored]]


@pytest.mark.parametrize(("n", "b", "seq_len"), _EVAL_CASES)
def test_eval_scores_every_target_exactly_once(n, b, seq_len):
    stream = np.arange(n, dtype=np.int32)  # id = position, so a target names its position
    batches = list(eval_windows(stream, b, seq_len))
    assert sorted(_scored_targets(batches)) == list(range(1, n))
    for batch in batches:
        assert batch.inputs.shape == batch.targets.shape == batch.scored.shape == (b, seq_len)
        assert batch.inputs.dtype == batch.targets.dtype == np.int64
        assert batch.oracle_logp is None
        real = batch.scored
        assert (batch.targets[real] == batch.inputs[real] + 1).all()


@pytest.mark.parametrize(("n", "b", "seq_len"), _EVAL_CASES)
def test_eval_never_score_ids_are_context_only(n, b, seq_len):
    stream = np.arange(n, dtype=np.int64)
    never = {i for i in range(n) if i % 5 == 0}
    got = _scored_targets(eval_windows(stream, b, seq_len, never_score=never))
    assert sorted(got) == [i for i in range(1, n) if i not in never]
    assert count_scored(stream, never) == len(got)
    assert count_scored(stream, np.array(sorted(never))) == len(got)


def test_eval_rows_continue_across_batches():
    stream = np.arange(200)
    batches = list(eval_windows(stream, 4, 7))
    for prev, nxt in itertools.pairwise(batches):
        cont = prev.scored[:, -1] & nxt.scored[:, 0]
        assert cont.any()
        assert (nxt.inputs[cont, 0] == prev.targets[cont, -1]).all()
    row_len = -(-199 // 4)
    assert [int(b.inputs[1, 0]) for b in batches[:1]] == [row_len]  # row 1 starts at position R


@pytest.mark.parametrize("max_tokens", [1, 5, 17, 60, 500])
def test_eval_max_tokens_scores_the_first_targets(max_tokens):
    stream = np.arange(100)
    never = {i for i in range(100) if i % 13 == 0}
    positions = [i for i in range(1, 100) if i not in never]
    batches = eval_windows(stream, 3, 8, max_tokens=max_tokens, never_score=never)
    assert sorted(_scored_targets(batches)) == positions[:max_tokens]


def test_train_windows_continue_and_wrap():
    n, b, seq_len = 103, 3, 5
    stream = np.arange(n)
    row_len = (n - 1) // b  # 34
    steps = train_steps_per_epoch(n, b, seq_len)
    assert steps == row_len // seq_len == 6
    batches = [train_windows(stream, s, b, seq_len) for s in range(2 * steps + 1)]
    for s, batch in enumerate(batches[:steps]):
        assert (batch.inputs[:, 0] == np.arange(b) * row_len + s * seq_len).all()
        assert (batch.targets == batch.inputs + 1).all()
        assert batch.scored.all() and batch.oracle_logp is None
    for prev, nxt in itertools.pairwise(batches[:steps]):
        assert (nxt.inputs[:, 0] == prev.targets[:, -1]).all()
    for s in range(steps + 1):  # the next epoch reads the same windows
        assert (batches[s + steps].inputs == batches[s].inputs).all()
    assert batches[-1].targets.max() <= row_len * b  # never reads past the row's overlap token


def test_train_windows_never_score():
    stream = np.tile(np.array([7, 1, 2, 3]), 25)
    batch = train_windows(stream, 0, 2, 6, never_score={7})
    assert (batch.scored == (batch.targets != 7)).all()


def test_train_split_too_small():
    with pytest.raises(ValueError, match=r"too small for batch_size x seq_len = 4 x 10"):
        train_windows(np.arange(40), 0, 4, 10)
    with pytest.raises(ValueError, match="too small"):
        train_steps_per_epoch(2, 2, 1)


@pytest.mark.parametrize(
    ("stream", "kwargs", "match"),
    [
        (np.arange(1), {}, "at least 2"),
        (np.zeros((3, 3), dtype=int), {}, "1-D integer"),
        (np.arange(10.0), {}, "1-D integer"),
        (np.arange(10), {"batch_size": 0}, "batch_size must be a positive integer"),
        (np.arange(10), {"seq_len": -1}, "seq_len must be a positive integer"),
    ],
)
def test_argument_errors(stream, kwargs, match):
    args = {"batch_size": 2, "seq_len": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        list(eval_windows(stream, **args))
    with pytest.raises(ValueError, match=match):
        train_windows(stream, 0, **args)


def test_bad_step_and_max_tokens():
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        train_windows(np.arange(100), -1, 2, 2)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        list(eval_windows(np.arange(100), 2, 2, max_tokens=0))
