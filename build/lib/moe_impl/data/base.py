"""What every corpus gives the training loop: batches by step, evaluation passes, its vocabulary.

A corpus is any object with the attributes and methods of `Corpus` (a Protocol, so the synthetic
generator and the file readers share no base class). Batches are numpy arrays; the training loop
moves them to the device. Ids are word-level; `vocab_size` is the model's input and output size.

Training batches are a pure function of the step (`train_batch(step, ...)`), so a resumed run reads
exactly the batches an uninterrupted one would, with no iterator state to save. When
`carries_state` is True, row r of step s+1 continues row r of step s (one long token stream per
row, LSTM state carried across steps, as Jozefowicz et al. and the paper train on LM1B); otherwise
every row starts a new context and the state is reset each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np


class Batch(NamedTuple):
    inputs: np.ndarray  # (B, L) int64
    targets: np.ndarray  # (B, L) int64: the next token
    scored: np.ndarray  # (B, L) bool: True where the target counts (a word or </S>; not padding)
    oracle_logp: np.ndarray | None  # (B, L) float64 log p_true(target | past), 0 where not scored;
    # None when the true distribution is unknown (real text)


class Corpus(Protocol):
    name: str  # e.g. "synthetic", "lm1b", "text"
    vocab_size: int  # ids are 0 .. vocab_size - 1
    carries_state: bool  # rows continue across training steps (see module docstring)
    ids_by_frequency: bool  # id order is frequency rank (the log-uniform sampled-softmax proposal)

    def train_batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
        """The batch of training step `step` (0-based); wraps around into further epochs."""
        ...

    def steps_per_epoch(self, batch_size: int, seq_len: int) -> int | None:
        """Training steps in one pass over the training data; None for an endless stream."""
        ...

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_tokens: int | None = None
    ) -> Iterator[Batch]:
        """Batches that score every target of `split` ("valid" or "test") exactly once, or the
        first `max_tokens` scored targets of it (required for an endless stream)."""
        ...

    def floor_nats(self) -> float | None:
        """The Bayes-optimal cross-entropy per scored token if known (synthetic), else None."""
        ...

    def describe(self) -> dict:
        """JSON-ready facts for the run's summary (sizes, paths, vocabulary, token counts)."""
        ...
