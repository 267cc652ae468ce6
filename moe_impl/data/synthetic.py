"""TopicMarkov: a synthetic, capacity-bound language-modelling corpus with an exact perplexity floor.

Described in docs/data.md. Each sequence draws a topic t (a header token that is
context, never scored), then walks a sparse Markov chain: from state v (START first) it emits `</S>`
with probability e, else the k-th of the K successors of row (t, v) with probability ∝ k^-β. The K
successors of a row are distinct tokens drawn without replacement from a Zipf(s) base distribution,
so unigram statistics look like language, and every row has the same entropy

    H_row = h(e) + (1 − e)·H(q),   h(e) = −e ln e − (1 − e) ln(1 − e),   q_k ∝ k^-β,

which is exactly the Bayes-optimal cross-entropy per scored token: the perplexity floor is
exp(H_row). Reaching it means storing T·(V+1)·K successor facts, whose count grows with the topics
while the compute per token does not: the regime where more experts should help (docs/data.md).

Topic clusters (`num_clusters` C, `shared_fanout` K_s > 0) give the facts levels: the K_s most
probable successors of row (t, v) are shared by the topics of t's cluster (t mod C), the other
K − K_s are t's own. A model that reads only the cluster from the header gets the shared mass right,
one that stores every topic's rows gets the rest; every row still has K distinct successors with
the same q, so the floor above is unchanged.

The corpus is never stored: every random number is a counter-based hash of (seed, split, sequence,
position), so sequence j of a split is the same whichever batch asks for it (deterministic random
access), splits are disjoint streams over the same tables, and generation is vectorised over a batch.

Token ids: 0..V-1 content words, V = `</S>`, V+1 .. V+T the topic headers `<T_t>`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moe_impl.data.base import Batch

SPLITS = {"train": 0, "valid": 1, "test": 2}
_MAX_TABLE_ENTRIES = 50_000_000  # precomputed successor table; larger configs would need lazy rows


@dataclass(frozen=True, kw_only=True)
class TopicMarkovConfig:
    vocab_size: int = 512  # V content words
    num_topics: int = 64  # T
    fanout: int = 4  # K successors per (topic, state) row
    # Topic clusters: topic t belongs to cluster t mod C, and the first `shared_fanout` successors
    # of each of its rows (the most probable slots) are the cluster's, the rest the topic's own.
    # 0 shared slots (the default) makes every row the topic's own.
    num_clusters: int = 1  # C
    shared_fanout: int = 0  # K_s of the K slots, shared by the topics of a cluster
    zipf_s: float = 1.0  # base distribution b_w ∝ w^-s
    row_beta: float = 1.0  # within-row choice q_k ∝ k^-β
    eos_prob: float = 1 / 16  # e
    max_len: int = 256  # content tokens per sequence at most (then `</S>` is forced; see floor)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_topics", "fanout", "max_len", "num_clusters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if self.fanout > self.vocab_size:
            raise ValueError(
                f"data.fanout={self.fanout} must be <= data.vocab_size={self.vocab_size}"
            )
        if (
            isinstance(self.shared_fanout, bool)
            or not isinstance(self.shared_fanout, int)
            or not 0 <= self.shared_fanout <= self.fanout
        ):
            raise ValueError(
                f"data.shared_fanout must be an integer in [0, data.fanout={self.fanout}], "
                f"got {self.shared_fanout!r}"
            )
        if self.num_clusters > self.num_topics:
            raise ValueError(
                f"data.num_clusters={self.num_clusters} must be <= "
                f"data.num_topics={self.num_topics}"
            )
        if isinstance(self.eos_prob, bool) or not isinstance(self.eos_prob, int | float):
            raise ValueError(f"data.eos_prob must be a number, got {self.eos_prob!r}")
        if not 0.0 < self.eos_prob < 1.0:
            raise ValueError(f"data.eos_prob must be in (0, 1), got {self.eos_prob!r}")
        for name in ("zipf_s", "row_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"data.{name} must be a number, got {value!r}")
            if not 0.0 <= value < math.inf:
                raise ValueError(f"data.{name} must be finite and >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed must be an integer >= 0, got {self.seed!r}")
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
        (Gumbel-top-K: the ordered sample without replacement). With shared slots, each cluster
        first draws its K_s successors per state; each topic then draws its own K − K_s from the
        words its cluster's row does not hold, so a row's K successors stay distinct."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        log_base = -cfg.zipf_s * np.log(np.arange(1, cfg.vocab_size + 1, dtype=np.float64))
        rows = np.arange(cfg.vocab_size + 1)[:, None]

        def draw(count: int, exclude: np.ndarray | None = None) -> np.ndarray:
            keys = log_base + rng.gumbel(size=(cfg.vocab_size + 1, cfg.vocab_size))
            if exclude is not None:
                keys[rows, exclude] = -np.inf
            top = np.argpartition(-keys, count - 1, axis=1)[:, :count]
            order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
            return np.take_along_axis(top, order, axis=1)

        shared = (
            [draw(cfg.shared_fanout) for _ in range(cfg.num_clusters)] if cfg.shared_fanout else []
        )
        own = cfg.fanout - cfg.shared_fanout
        table = np.empty((cfg.num_topics, cfg.vocab_size + 1, cfg.fanout), dtype=np.int32)
        for t in range(cfg.num_topics):  # one topic at a time bounds the Gumbel buffer
            if not shared:
                table[t] = draw(cfg.fanout)
                continue
            common = shared[t % cfg.num_clusters]
            table[t, :, : cfg.shared_fanout] = common
            if own:
                table[t, :, cfg.shared_fanout :] = draw(own, exclude=common)
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

    # --- the Corpus protocol (moe_impl/data/base.py) ---------------------------------------------

    name = "synthetic"
    carries_state = False  # every training row starts with a topic header: no context to carry
    ids_by_frequency = False  # word ids follow the Zipf base order, headers and </S> do not

    @property
    def vocab_size(self) -> int:
        return self.cfg.num_tokens

    def _stream(self, split: str, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sequences `index` of `split`, packed (see `_pack`)."""
        return self._pack(*self.sequences(split, index))

    def _pack(self, topics, tokens: list, logps: list) -> tuple[np.ndarray, ...]:
        """Sequences concatenated as [<T_t>, x_1 ... x_n, </S>] each: (tokens, oracle
        log-probability of each token given its past (0 for headers), is-header flags, the
        position where each sequence starts)."""
        lengths = np.array([seq.size + 1 for seq in tokens], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        header = np.zeros(int(lengths.sum()), dtype=bool)
        header[starts] = True
        stream = np.empty(header.size, dtype=np.int64)
        stream[starts] = self.cfg.vocab_size + 1 + np.asarray(topics, dtype=np.int64)
        stream[~header] = np.concatenate(tokens)
        logp = np.zeros(header.size)
        logp[~header] = np.concatenate(logps)
        return stream, logp, header, starts

    def train_batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
        """Training step `step`: each row packs whole sequences back to back, LM1B-style ("whenever
        a sentence ends, a new one starts without any padding"), starting with a header, and cuts
        the last one at the row's end. Row r of step s reads train sequences from
        (s·B + r)·(L + 1) on, a range no other row touches, so a batch is a pure function of the
        step. The cut changes no scored token's true conditional (it depends on earlier tokens
        only), so the floor and the oracle stay exact."""
        _check_shape(batch_size, seq_len)
        stride = seq_len + 1  # a sequence takes >= 2 positions: never more than this many per row
        mean_len = 2.0 + (1.0 - self.cfg.eos_prob) / self.cfg.eos_prob
        count = min(int(1.5 * stride / mean_len) + 4, stride)
        base = (step * batch_size + np.arange(batch_size)) * stride
        # one vectorised draw for every row; the rare row it leaves short is redrawn longer
        index = (base[:, None] + np.arange(count)[None, :]).reshape(-1)
        stream, logp, header, starts = self._stream("train", index)
        row_start = starts[::count]
        row_end = np.append(row_start[1:], stream.size)
        rows = []
        for r in range(batch_size):
            lo, hi = row_start[r], row_end[r]
            part = stream[lo:hi], logp[lo:hi], header[lo:hi]
            n = count
            while part[0].size < stride and n < stride:
                n = min(2 * n, stride)
                part = self._stream("train", np.arange(base[r], base[r] + n))[:3]
            rows.append(tuple(x[:stride] for x in part))
        stream, logp, header = (np.stack(x) for x in zip(*rows, strict=True))
        return Batch(
            inputs=stream[:, :-1].astype(np.int64),
            targets=stream[:, 1:].astype(np.int64),
            scored=~header[:, 1:],
            oracle_logp=np.where(header[:, 1:], 0.0, logp[:, 1:]),
        )

    def steps_per_epoch(self, batch_size: int, seq_len: int) -> None:
        return None  # an endless stream: train by token budget

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_tokens: int | None = None
    ) -> Iterator[Batch]:
        """The first sequences of `split` holding at least `max_tokens` scored tokens, every token
        scored exactly once: row r gets a contiguous run of whole sequences, rows are padded to one
        length and cut into windows of `seq_len` that continue across batches (the trainer carries
        the LSTM state), so no token loses its context. The set depends on max_tokens only, not on
        the batch shape."""
        _check_shape(batch_size, seq_len)
        if split not in ("valid", "test"):
            raise ValueError(f"evaluation split must be 'valid' or 'test', got {split!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(
                f"eval.tokens must be a positive integer for the endless synthetic corpus, "
                f"got {max_tokens!r}"
            )
        topics, seqs, logps = [], [], []
        total, start, chunk = 0, 0, 1024
        while total < max_tokens:
            t, s, lp = self.sequences(split, np.arange(start, start + chunk))
            start += chunk
            for j in range(len(s)):
                if total >= max_tokens:
                    break
                topics.append(t[j])
                seqs.append(s[j])
                logps.append(lp[j])
                total += s[j].size
        stream, logp, header, starts = self._pack(topics, seqs, logps)
        ends = np.append(starts, stream.size)  # row r: whole sequences bounds[r] .. bounds[r+1]
        bounds = [round(r * len(seqs) / batch_size) for r in range(batch_size + 1)]
        rows = [
            tuple(x[ends[bounds[r]] : ends[bounds[r + 1]]] for x in (stream, logp, header))
            for r in range(batch_size)
        ]
        width = max(row[0].size for row in rows)
        padded = -(-max(width - 1, 1) // seq_len) * seq_len + 1
        inputs = np.full((batch_size, padded), self.cfg.eos_id, dtype=np.int64)
        logp = np.zeros((batch_size, padded))
        scored = np.zeros((batch_size, padded), dtype=bool)
        for r, (tok, lp, head) in enumerate(rows):
            inputs[r, : tok.size] = tok
            logp[r, : tok.size] = lp
            scored[r, : tok.size] = ~head
        for lo in range(0, padded - 1, seq_len):
            hi = lo + seq_len
            yield Batch(
                inputs=inputs[:, lo:hi],
                targets=inputs[:, lo + 1 : hi + 1],
                scored=scored[:, lo + 1 : hi + 1],
                oracle_logp=logp[:, lo + 1 : hi + 1],
            )

    def describe(self) -> dict:
        cfg = self.cfg
        return {
            "corpus": self.name,
            **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "vocab_size": self.vocab_size,
            "floor_nats": self.floor_nats(),
            "successor_rows": cfg.num_topics * (cfg.vocab_size + 1),
        }


def _check_shape(batch_size: int, seq_len: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
