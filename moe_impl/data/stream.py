"""Fixed-length windows over one long token stream: training batches by step, and evaluation passes.

The real-text corpora (docs/data.md: LM1B, WikiText-103) are each one concatenated stream of token
ids. Training follows Jozefowicz et al. 2016 and the paper (App. C.1): the stream is cut into
`batch_size` contiguous rows, each step reads the next `seq_len` tokens of every row, and the
trainer carries the LSTM state from step to step, never resetting it at a sentence boundary.
Evaluation lays the whole split out the same way, so that every target is scored exactly once.

Ids in `never_score` are context only: where one is the *target* it is not scored (LM1B's `<S>`,
which is never predicted, docs/data.md). Pure numpy, no I/O; the stream may be a read-only memmap
of any integer dtype, and only the windows asked for are read.

Shape suffixes: N = tokens in the stream, B = batch rows, L = seq_len (time steps per batch).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator

import numpy as np

from moe_impl.data.base import Batch

_SCAN_CHUNK = 1 << 22  # tokens per chunk when scanning a stream (bounds the temporary arrays)


def _check_sizes(stream_N: np.ndarray, batch_size: int, seq_len: int) -> None:
    if stream_N.ndim != 1 or not np.issubdtype(stream_N.dtype, np.integer):
        raise ValueError(
            f"the token stream must be a 1-D integer array, got shape {stream_N.shape} "
            f"and dtype {stream_N.dtype}"
        )
    if stream_N.size < 2:
        raise ValueError(
            f"the token stream has {stream_N.size} token(s); at least 2 are needed "
            "(an input and its target)"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _never_score_ids(never_score: Collection[int] | np.ndarray) -> np.ndarray:
    if isinstance(never_score, np.ndarray):
        return never_score.astype(np.int64).ravel()
    return np.asarray(sorted(never_score), dtype=np.int64)


def _scored(targets: np.ndarray, never_ids: np.ndarray) -> np.ndarray:
    if never_ids.size == 0:
        return np.ones(targets.shape, dtype=bool)
    return ~np.isin(targets, never_ids)


def train_steps_per_epoch(num_tokens: int, batch_size: int, seq_len: int) -> int:
    """Steps in one pass over a stream of `num_tokens` tokens: each of the `batch_size` rows holds
    N_r = (N − 1) // batch_size inputs (plus one token of overlap for the last target), read
    `seq_len` at a time; the last N_r mod seq_len inputs of each row are not used."""
    row_len = (num_tokens - 1) // batch_size
    steps = row_len // seq_len
    if steps < 1:
        raise ValueError(
            f"the training split is too small for batch_size x seq_len = {batch_size} x {seq_len}: "
            f"{num_tokens:,} tokens give rows of {row_len:,} inputs, fewer than seq_len={seq_len}"
        )
    return steps


def train_windows(
    stream_N: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    never_score: Collection[int] | np.ndarray = (),
) -> Batch:
    """The batch of training step `step`: row r reads inputs stream[r·N_r + s·L : r·N_r + s·L + L]
    and the tokens one position later as targets, s = step mod steps_per_epoch, so within an epoch
    row r of step s+1 continues row r of step s, and every epoch repeats the same windows."""
    _check_sizes(stream_N, batch_size, seq_len)
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    steps = train_steps_per_epoch(stream_N.size, batch_size, seq_len)
    row_len = (stream_N.size - 1) // batch_size
    start_B = np.arange(batch_size, dtype=np.int64) * row_len + (int(step) % steps) * seq_len
    index_BL = start_B[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
    inputs_BL = np.asarray(stream_N[index_BL], dtype=np.int64)
    targets_BL = np.asarray(stream_N[index_BL + 1], dtype=np.int64)
    scored_BL = _scored(targets_BL, _never_score_ids(never_score))
    return Batch(inputs_BL, targets_BL, scored_BL, None)


def count_scored(stream_N: np.ndarray, never_score: Collection[int] | np.ndarray = ()) -> int:
    """Scored targets of a stream: positions 1 .. N−1 whose id is not in `never_score`."""
    never_ids = _never_score_ids(never_score)
    total = 0
    for start in range(1, stream_N.size, _SCAN_CHUNK):
        total += int(_scored(stream_N[start : start + _SCAN_CHUNK], never_ids).sum())
    return total


def _scored_prefix_end(stream_N: np.ndarray, never_ids: np.ndarray, max_tokens: int) -> int:
    """The smallest p such that targets 1 .. p hold `max_tokens` scored ones (N − 1 if fewer)."""
    seen = 0
    for start in range(1, stream_N.size, _SCAN_CHUNK):
        cumulative = np.cumsum(_scored(stream_N[start : start + _SCAN_CHUNK], never_ids))
        if cumulative.size and seen + int(cumulative[-1]) >= max_tokens:
            return start + int(np.searchsorted(cumulative, max_tokens - seen))
        seen += int(cumulative[-1]) if cumulative.size else 0
    return stream_N.size - 1


def eval_windows(
    stream_N: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_tokens: int | None = None,
    never_score: Collection[int] | np.ndarray = (),
) -> Iterator[Batch]:
    """Batches that score every target of the stream (positions 1 .. N−1) exactly once.

    The N − 1 (input, target) pairs are laid out in `batch_size` rows of R = ceil((N − 1) / B)
    consecutive pairs; batch j holds columns j·L .. j·L + L − 1 of every row, so row r of batch
    j+1 continues row r of batch j (the trainer carries the state across batches). Pairs past the
    end of the stream (the last row(s), the last batch's tail) are padding: id 0, scored=False.
    Each row starts without context, which costs a little at B > 1 (exact stream order at B = 1).

    With `max_tokens`, only the shortest prefix of the stream holding `max_tokens` scored targets
    is laid out, so exactly min(max_tokens, all) targets are scored, the first ones of the stream.
    """
    _check_sizes(stream_N, batch_size, seq_len)
    never_ids = _never_score_ids(never_score)
    last = stream_N.size - 1  # last target position
    if max_tokens is not None:
        if (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int | np.integer)
            or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        last = _scored_prefix_end(stream_N, never_ids, max_tokens)
    return _eval_batches(stream_N, batch_size, seq_len, last, never_ids)


def _eval_batches(
    stream_N: np.ndarray, batch_size: int, seq_len: int, last: int, never_ids: np.ndarray
) -> Iterator[Batch]:
    """The generator behind `eval_windows` (kept apart so that argument errors raise at the call)."""
    row_len = math.ceil(last / batch_size)
    start_B = np.arange(batch_size, dtype=np.int64) * row_len
    for column in range(0, row_len, seq_len):
        offset_L = column + np.arange(seq_len, dtype=np.int64)
        index_BL = start_B[:, None] + offset_L[None, :]  # input positions
        real_BL = (offset_L[None, :] < row_len) & (index_BL + 1 <= last)
        safe_BL = np.where(real_BL, index_BL, 0)
        inputs_BL = np.where(real_BL, np.asarray(stream_N[safe_BL], dtype=np.int64), 0)
        targets_BL = np.where(real_BL, np.asarray(stream_N[safe_BL + 1], dtype=np.int64), 0)
        scored_BL = real_BL & _scored(targets_BL, never_ids)
        yield Batch(inputs_BL, targets_BL, scored_BL, None)


class StreamCorpus:
    """The Corpus methods (moe_impl/data/base.py) of a corpus that is one token stream per split:
    a subclass provides `stream(split)` and `never_score`, the ids never scored as targets."""

    carries_state = True  # row r of step s + 1 continues row r of step s
    never_score: tuple[int, ...] = ()

    def stream(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
        """Windows of the training stream (`train_windows`)."""
        return train_windows(self.stream("train"), step, batch_size, seq_len, self.never_score)

    def steps_per_epoch(self, batch_size: int, seq_len: int) -> int:
        return train_steps_per_epoch(self.stream("train").size, batch_size, seq_len)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_tokens: int | None = None
    ) -> Iterator[Batch]:
        """Every target of `split` ("valid" or "test") but the never-scored ids, scored once."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return eval_windows(self.stream(split), batch_size, seq_len, max_tokens, self.never_score)

    def floor_nats(self) -> None:
        return None  # real text: the true distribution is unknown
