"""The unigram perplexity of a corpus's evaluation tokens: the perplexity of the best context-free
model, a yardstick for a run's test perplexity (summary.json's corpus.unigram_perplexity).

For the scored target tokens x_1 .. x_N of an evaluation pass with empirical frequencies
p(w) = count(w) / N, it is exp(H) with H = −Σ_w p(w) ln p(w): the perplexity on those tokens of the
unigram model fitted to them, the lowest any context-free model (one fixed distribution over the
vocabulary) can have there, as p minimizes their cross-entropy. A model that uses context should
beat it; on the synthetic corpus the floor perplexity (exp(floor_nats)) lies below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from moe_impl.data.base import Batch, Corpus


def unigram_perplexity(tokens: Iterable[np.ndarray]) -> float:
    """exp of the entropy (nats) of the empirical distribution of the ids in `tokens` (arrays of
    non-negative ids, concatenated). ValueError when there are none."""
    counts = np.zeros(0, dtype=np.int64)
    for chunk in tokens:
        ids = np.asarray(chunk, dtype=np.int64).ravel()
        if ids.size == 0:
            continue
        if ids.min() < 0:
            raise ValueError(f"token ids must be non-negative, got {int(ids.min())}")
        more = np.bincount(ids)
        if more.size > counts.size:
            more[: counts.size] += counts
            counts = more
        else:
            counts[: more.size] += more
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no tokens: the unigram perplexity is undefined")
    p = counts[counts > 0] / total
    return math.exp(float(-(p * np.log(p)).sum()))


def scored_targets(batches: Iterable[Batch]) -> Iterable[np.ndarray]:
    """The scored target ids of each batch (`targets[scored]`): the tokens an evaluation scores."""
    for batch in batches:
        yield batch.targets[batch.scored]


def eval_unigram_perplexity(
    corpus: Corpus, split: str, batch_size: int, seq_len: int, max_tokens: int | None
) -> float:
    """The unigram perplexity of exactly the tokens an evaluation of `split` with this batch shape
    and budget scores (Trainer.evaluate: `corpus.eval_batches(split, eval.batch_size,
    eval.seq_len, eval.tokens)`, every batch's `targets[scored]`, all rows of every process): the
    first `max_tokens` scored targets of the split (on the synthetic corpus, the first whole
    sequences holding at least that many), or all of them when max_tokens is None."""
    return unigram_perplexity(
        scored_targets(corpus.eval_batches(split, batch_size, seq_len, max_tokens))
    )
