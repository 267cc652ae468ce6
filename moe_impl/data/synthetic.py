"""TopicMarkov: a synthetic, capacity-bound language-modelling corpus with an exact perplexity floor.

Design A of `../shared/reference/data.md` §3. Each sequence draws a topic t (a header token that is
context, never scored), then walks a sparse Markov chain: from state v (START first) it emits `</S>`
with probability e, else the k-th of the K successors of row (t, v) with probability ∝ k^-β. The K
successors of a row are distinct tokens drawn without replacement from a Zipf(s) base distribution,
so unigram statistics look like language, and every row has the same entropy

    H_row = h(e) + (1 − e)·H(q),   h(e) = −e ln e − (1 − e) ln(1 − e),   q_k ∝ k^-β,

which is exactly the Bayes-optimal cross-entropy per scored token: the perplexity floor is
exp(H_row). Reaching it means storing T·(V+1)·K successor facts, whose count grows with the topics
while the compute per token does not: the regime where more experts should help (data.md §3.3).

The corpus is never stored: every random number is a counter-based hash of (seed, split, sequence,
position), so sequence j of a split is the same whichever batch asks for it (deterministic random
access), splits are disjoint streams over the same tables, and generation is vectorised over a batch.

Token ids: 0..V-1 content words, V = `</S>`, V+1 .. V+T the topic headers `<T_t>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SPLITS = {"train": 0, "valid": 1, "test": 2}
_MAX_TABLE_ENTRIES = 50_000_000  # precomputed successor table; larger configs would need lazy rows


@dataclass(frozen=True, kw_only=True)
class TopicMarkovConfig:
    vocab_size: int = 512  # V content words
    num_topics: int = 64  # T
    fanout: int = 4  # K successors per (topic, state) row
    zipf_s: float = 1.0  # base distribution b_w ∝ w^-s
    row_beta: float = 1.0  # within-row choice q_k ∝ k^-β
    eos_prob: float = 1 / 16  # e
    max_len: int = 256  # content tokens per sequence at most (then `</S>` is forced; see floor)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_topics", "fanout", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if self.fanout > self.vocab_size:
            raise ValueError(
                f"data.fanout={self.fanout} must be <= data.vocab_size={self.vocab_size}"
            )
        if not 0.0 < self.eos_prob < 1.0:
            raise ValueError(f"data.eos_prob must be in (0, 1), got {self.eos_prob!r}")
        for name in ("zipf_s", "row_beta"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)!r}")
        entries = self.num_topics * (self.vocab_size + 1) * self.fanout
        if entries > _MAX_TABLE_ENTRIES:
            raise ValueError(
                f"data: num_topics·(vocab_size+1)·fanout = {entries:,} successor entries exceeds "
                f"{_MAX_TABLE_ENTRIES:,}; use fewer topics, words or successors"
            )

    @property
    def eos_id(self) -> int:
        return self.vocab_size

    @property
    def num_tokens(self) -> int:
        """Size of the model's vocabulary: content words, `</S>` and the topic headers."""
        return self.vocab_size + 1 + self.num_topics


class Batch(NamedTuple):
    inputs: np.ndarray  # (B, L) int64: the topic header, then the sequence's tokens
    targets: np.ndarray  # (B, L) int64: the next token (`</S>` pads after the end)
    scored: np.ndarray  # (B, L) bool: True for real targets, False for padding
    oracle_logp: np.ndarray  # (B, L) float64: log p_true(target | context); 0 where not scored


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (splitmix64's finaliser), vectorised; uint64 arithmetic wraps."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) floats, one per broadcast element of the integer keys (a counter-based RNG)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for key in keys:
            h = _splitmix64(np.asarray(h, dtype=np.uint64) ^ np.asarray(key, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


class TopicMarkov:
    """The generator: successor tables, sequences by index, batches, and the exact floor."""

    def __init__(self, cfg: TopicMarkovConfig) -> None:
        self.cfg = cfg
        k = np.arange(1, cfg.fanout + 1, dtype=np.float64)
        q = k ** (-cfg.row_beta)
        self.row_probs = q / q.sum()  # q_k
        self._row_cdf = np.cumsum(self.row_probs)
        self.successors = self._successor_table()  # (T, V+1, K); row V is the START state

    def _successor_table(self) -> np.ndarray:
        """K distinct successors per row, drawn without replacement from the Zipf base in order
        (Gumbel-top-K: the ordered sample without replacement)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        log_base = -cfg.zipf_s * np.log(np.arange(1, cfg.vocab_size + 1, dtype=np.float64))
        table = np.empty((cfg.num_topics, cfg.vocab_size + 1, cfg.fanout), dtype=np.int32)
        for t in range(cfg.num_topics):  # one topic at a time bounds the Gumbel buffer
            keys = log_base + rng.gumbel(size=(cfg.vocab_size + 1, cfg.vocab_size))
            top = np.argpartition(-keys, cfg.fanout - 1, axis=1)[:, : cfg.fanout]
            order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
            table[t] = np.take_along_axis(top, order, axis=1)
        return table

    def floor_nats(self) -> float:
        """Bayes-optimal cross-entropy per scored token, H_row (ignores the max_len cap, whose
        probability (1-e)^max_len is negligible for the defaults)."""
        e = self.cfg.eos_prob
        h_e = -e * math.log(e) - (1 - e) * math.log(1 - e)
        h_q = -float(np.sum(self.row_probs * np.log(self.row_probs)))
        return h_e + (1 - e) * h_q

    def sequences(
        self, split: str, index: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Sequences `index` of `split`: (topics (n,), tokens per sequence ending in `</S>`,
        oracle log-probabilities per token). Deterministic per (seed, split, index)."""
        cfg = self.cfg
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
        log_q = np.log(self.row_probs)
        for i in range(cfg.max_len + 1):
            u_eos = _uniform(stream, index, i, 0xE05)
            stop = alive & ((u_eos < cfg.eos_prob) | (i == cfg.max_len))
            tokens[stop, i] = cfg.eos_id
            logp[stop, i] = log_eos if i < cfg.max_len else 0.0  # forced at the cap: p = 1
            go = alive & ~stop
            if go.any():
                u = _uniform(stream, index[go], i, 0x5CC)
                choice = np.minimum(np.searchsorted(self._row_cdf, u, side="right"), cfg.fanout - 1)
                nxt = self.successors[topics[go], state[go], choice]
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

    def batch(self, split: str, step: int, batch_size: int, seq_len: int) -> Batch:
        """Sequences step·B ... step·B + B − 1 of `split`, one per row: input [<T_t>, x_1 ... x_n],
        target [x_1 ... x_n, </S>], padded to `seq_len`. Needs seq_len > max_len so that no scored
        token is cut (a cut would silently change the loss)."""
        cfg = self.cfg
        if seq_len <= cfg.max_len:
            raise ValueError(
                f"seq_len={seq_len} must exceed data.max_len={cfg.max_len}: every sequence "
                "(at most max_len words and </S>) must fit in one row"
            )
        index = np.arange(step * batch_size, (step + 1) * batch_size)
        topics, tokens, logps = self.sequences(split, index)
        inputs = np.full((batch_size, seq_len), cfg.eos_id, dtype=np.int64)
        targets = np.full((batch_size, seq_len), cfg.eos_id, dtype=np.int64)
        scored = np.zeros((batch_size, seq_len), dtype=bool)
        oracle = np.zeros((batch_size, seq_len), dtype=np.float64)
        inputs[:, 0] = cfg.vocab_size + 1 + topics  # the header stands for START
        for row, (seq, lp) in enumerate(zip(tokens, logps, strict=True)):
            n = seq.size
            inputs[row, 1:n] = seq[:-1]
            targets[row, :n] = seq
            scored[row, :n] = True
            oracle[row, :n] = lp
        return Batch(inputs, targets, scored, oracle)
