"""The TopicMarkov training batch as it was generated until issue 28, kept as the reference.

`moe_impl/data/synthetic.py` makes the same batches, bit for bit, with a vectorised walk over row
positions (`TopicMarkov.train_batch`); this module is what the tests (tests/test_synthetic_fast.py)
and `python -m moe_impl bench --data` compare it with. It walks every drawn sequence up to
max_len + 1 positions and redraws a row whose first sequences are too short with twice as many:
slow (~400 ms per 262,144-token batch of the gpu/ corpus on one core), and never to be optimised,
since its value is that it is the code every earlier run trained on. Do not edit it.
"""

from __future__ import annotations

import math

import numpy as np

from moe_impl.data.base import Batch
from moe_impl.data.synthetic import SPLITS, _check_shape, _uniform


def sequences(corpus, split: str, index: np.ndarray):
    """Sequences `index` of `split`: (topics (n,), tokens per sequence ending in `</S>`, oracle
    log-probabilities per token). Deterministic per (seed, split, index)."""
    cfg = corpus.cfg
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    index = np.asarray(index, dtype=np.uint64)
    stream = np.uint64(cfg.seed * 4 + SPLITS[split])
    topics = np.minimum(
        (_uniform(stream, index, 0xA11) * cfg.num_topics).astype(np.int64), cfg.num_topics - 1
    )
    n = index.size
    state = np.full(n, cfg.vocab_size, dtype=np.int64)  # START
    alive = np.ones(n, dtype=bool)
    tokens = np.full((n, cfg.max_len + 1), -1, dtype=np.int64)
    logp = np.zeros((n, cfg.max_len + 1), dtype=np.float64)
    log_eos, log_cont = math.log(cfg.eos_prob), math.log1p(-cfg.eos_prob)
    log_q = np.log(corpus.row_probs)
    for i in range(cfg.max_len + 1):
        u_eos = _uniform(stream, index, i, 0xE05)
        stop = alive & ((u_eos < cfg.eos_prob) | (i == cfg.max_len))
        tokens[stop, i] = cfg.eos_id
        logp[stop, i] = log_eos if i < cfg.max_len else 0.0  # forced at the cap: p = 1
        go = alive & ~stop
        if go.any():
            u = _uniform(stream, index[go], i, 0x5CC)
            choice = np.minimum(np.searchsorted(corpus._row_cdf, u, side="right"), cfg.fanout - 1)
            nxt = corpus.successors[topics[go], state[go], choice]
            tokens[go, i] = nxt
            logp[go, i] = log_cont + log_q[choice]
            state[go] = nxt
        alive &= ~stop
        if not alive.any():
            break
    lengths = (tokens >= 0).sum(1)
    return (
        topics,
        [tokens[j, : lengths[j]] for j in range(n)],
        [logp[j, : lengths[j]] for j in range(n)],
    )


def _stream(
    corpus, split: str, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sequences `index` of `split`, packed by the corpus's own `_pack` (unchanged by issue 28)."""
    return corpus._pack(*sequences(corpus, split, index))


def train_batch(corpus, step: int, batch_size: int, seq_len: int) -> Batch:
    """Training step `step` of `corpus` (a TopicMarkov), as `TopicMarkov.train_batch` made it
    until issue 28: each row packs whole sequences back to back, starting with a header, and cuts
    the last one at the row's end; row r of step s reads train sequences from (s·B + r)·(L + 1) on."""
    _check_shape(batch_size, seq_len)
    stride = seq_len + 1  # a sequence takes >= 2 positions: never more than this many per row
    mean_len = 2.0 + (1.0 - corpus.cfg.eos_prob) / corpus.cfg.eos_prob
    count = min(int(1.5 * stride / mean_len) + 4, stride)
    base = (step * batch_size + np.arange(batch_size)) * stride
    # one vectorised draw for every row; the rare row it leaves short is redrawn longer
    index = (base[:, None] + np.arange(count)[None, :]).reshape(-1)
    stream, logp, header, starts = _stream(corpus, "train", index)
    row_start = starts[::count]
    row_end = np.append(row_start[1:], stream.size)
    rows = []
    for r in range(batch_size):
        lo, hi = row_start[r], row_end[r]
        part = stream[lo:hi], logp[lo:hi], header[lo:hi]
        n = count
        while part[0].size < stride and n < stride:
            n = min(2 * n, stride)
            part = _stream(corpus, "train", np.arange(base[r], base[r] + n))[:3]
        rows.append(tuple(x[:stride] for x in part))
    stream, logp, header = (np.stack(x) for x in zip(*rows, strict=True))
    return Batch(
        inputs=stream[:, :-1].astype(np.int64),
        targets=stream[:, 1:].astype(np.int64),
        scored=~header[:, 1:],
        oracle_logp=np.where(header[:, 1:], 0.0, logp[:, 1:]),
    )
