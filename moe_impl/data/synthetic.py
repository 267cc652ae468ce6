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
A training batch is made by walking all its rows one position at a time (`TopicMarkov._rows`): the
same arrays, bit for bit, as the generator of the runs before issue 28, which is kept as the
reference in synthetic_reference.py. Large successor tables are cached on disk (table_cache.py).

Token ids: 0..V-1 content words, V = `</S>`, V+1 .. V+T the topic headers `<T_t>`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from moe_impl.data import table_cache
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


def _extend(h: np.ndarray | np.integer | int, key: np.ndarray | np.integer | int) -> np.ndarray:
    """One more key folded into the hash `h` (the counter RNG hashes its keys in order, so a
    prefix such as (seed, split, sequence) is hashed once and extended per position)."""
    with np.errstate(over="ignore"):
        return _splitmix64(np.asarray(h, dtype=np.uint64) ^ np.asarray(key, dtype=np.uint64))


# _splitmix64's constants, for _extend_array
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SHIFT30, _SHIFT27, _SHIFT31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _extend_array(h: npt.NDArray[np.uint64], key: np.ndarray | int) -> np.ndarray:
    """`_extend` for an array `h` (a new array): the same operations in place, so the same bits
    with fewer temporaries. Array arithmetic wraps silently (only numpy scalars check overflow),
    so no errstate is needed; this is the generator's inner loop."""
    x = h ^ np.asarray(key, dtype=np.uint64)
    x += _GAMMA
    x ^= x >> _SHIFT30
    x *= _MUL1
    x ^= x >> _SHIFT27
    x *= _MUL2
    x ^= x >> _SHIFT31
    return x


def _unit(h: np.ndarray) -> np.ndarray:
    """The top 53 bits of a hash as a uniform float in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _uniform(*keys: np.ndarray | np.integer | int) -> np.ndarray:
    """Uniform [0, 1) floats, one per broadcast element of the integer keys (a counter-based RNG)."""
    h: Any = np.uint64(0)  # a numpy integer, then an array (or a scalar for scalar keys)
    for key in keys:
        h = _extend(h, key)
    return _unit(h)


class TopicMarkov:
    """The generator: successor tables, sequences by index, batches, and the exact floor."""

    def __init__(self, cfg: TopicMarkovConfig) -> None:
        self.cfg = cfg
        k = np.arange(1, cfg.fanout + 1, dtype=np.float64)
        q = k ** (-cfg.row_beta)
        self.row_probs = q / q.sum()  # q_k
        self._row_cdf = np.cumsum(self.row_probs)
        # (T, V+1, K); row V is the START state. Large tables come from the on-disk cache
        self.successors = table_cache.load_or_build(cfg, self._successor_table)

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
        # every draw is the counter hash of (seed·4 + split, sequence, position[, tag]) (_uniform);
        # the (stream, sequence) prefix is hashed once, and only live sequences draw
        prefix = _extend(_extend(0, np.uint64(cfg.seed * 4 + SPLITS[split])), index)
        u_topic = _unit(_extend(prefix, 0xA11))
        topics = np.minimum((u_topic * cfg.num_topics).astype(np.int64), cfg.num_topics - 1)
        n = index.size
        state = np.full(n, cfg.vocab_size, dtype=np.int64)  # START
        live = np.arange(n)  # the sequences that have not emitted </S>
        tokens = np.full((n, cfg.max_len + 1), -1, dtype=np.int64)
        logp = np.zeros((n, cfg.max_len + 1), dtype=np.float64)
        log_eos, log_cont = math.log(cfg.eos_prob), math.log1p(-cfg.eos_prob)
        log_q = np.log(self.row_probs)
        for i in range(cfg.max_len + 1):
            at = _extend_array(prefix[live], i)
            stop = (_unit(_extend_array(at, 0xE05)) < cfg.eos_prob) | (i == cfg.max_len)
            tokens[live[stop], i] = cfg.eos_id
            logp[live[stop], i] = log_eos if i < cfg.max_len else 0.0  # forced at the cap: p = 1
            go = live[~stop]
            if go.size:
                choice = _choose(self._row_cdf, _unit(_extend_array(at[~stop], 0x5CC)))
                nxt = self.successors[topics[go], state[go], choice]
                tokens[go, i] = nxt
                logp[go, i] = log_cont + log_q[choice]
                state[go] = nxt
            live = go
            if not live.size:
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
        only), so the floor and the oracle stay exact. The same arrays, bit for bit, as the
        generator every earlier run trained on (moe_impl/data/synthetic_reference.py), made by
        walking the rows' L + 1 positions instead of whole sequences (`_rows`)."""
        _check_shape(batch_size, seq_len)
        stride = seq_len + 1  # a sequence takes >= 2 positions: never more than this many per row
        first = (step * batch_size + np.arange(batch_size)) * stride
        stream, logp, header = self._rows("train", first, stride)
        return Batch(
            inputs=stream[:, :-1].astype(np.int64),
            targets=stream[:, 1:].astype(np.int64),
            scored=~header[:, 1:],
            oracle_logp=np.where(header[:, 1:], 0.0, logp[:, 1:]),
        )

    def _rows(
        self, split: str, first: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, oracle log-probabilities, is-header flags), each (rows, width): row r is the
        packed concatenation of sequences first[r], first[r] + 1, ... of `split` (as `_pack` lays
        them out) cut after `width` positions. All rows advance one position per iteration, so a
        row costs `width` hash draws whatever its sequences' lengths, and nothing past the cut is
        drawn. Every draw is `sequences`' counter hash of (seed, split, sequence, position[, tag]),
        with the (seed, split, sequence) prefix hashed once per sequence: the same numbers."""
        cfg = self.cfg
        rows = np.arange(first.size)
        # filled one position (a contiguous row of these) at a time, returned row-major
        tokens = np.empty((width, first.size), dtype=np.int64)
        logp = np.empty((width, first.size), dtype=np.float64)
        header = np.zeros((width, first.size), dtype=bool)
        walk = _Walk(self, split, np.asarray(first, dtype=np.int64))
        for p in range(width):
            starting = walk.at_header  # rows that begin a sequence here: its header
            start = rows[starting]
            walk.begin(start)
            tokens[p], logp[p] = walk.step(walking=~starting)
            tokens[p, start] = cfg.vocab_size + 1 + walk.topic[start]
            logp[p, start] = 0.0
            header[p, start] = True
        return (
            np.ascontiguousarray(tokens.T),
            np.ascontiguousarray(logp.T),
            np.ascontiguousarray(header.T),
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
        for r, (tok, row_logp, head) in enumerate(rows):
            inputs[r, : tok.size] = tok
            logp[r, : tok.size] = row_logp
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


class _Walk:
    """The state of one walk per row for `TopicMarkov._rows`: the row's current sequence (its
    index, hash prefix and topic), its Markov state and its position in the sequence. A row whose
    last token was `</S>` (or that has not started) is `at_header`: its next position is the header
    of its next sequence; the step computes a draw for it there too, which is discarded."""

    def __init__(self, corpus: TopicMarkov, split: str, first: np.ndarray) -> None:
        cfg = corpus.cfg
        self.cfg = cfg
        self.split_key = _extend(0, np.uint64(cfg.seed * 4 + SPLITS[split]))  # _uniform's 1st key
        self.next_index = first.copy()  # the index of each row's next sequence
        n = first.size
        self.prefix = np.zeros(n, dtype=np.uint64)  # hash of (seed, split, sequence)
        self.topic = np.zeros(n, dtype=np.int64)
        self.state = np.full(n, cfg.vocab_size, dtype=np.int64)
        self.position = np.zeros(n, dtype=np.uint64)  # of the next token in its sequence
        self.at_header = np.ones(n, dtype=bool)
        self.successors = corpus.successors.reshape(-1)  # row (t, v) at (t·(V+1) + v)·K
        self.row_cdf = corpus._row_cdf
        log_q = np.log(corpus.row_probs)
        self.log_eos = math.log(cfg.eos_prob)
        self.log_word = math.log1p(-cfg.eos_prob) + log_q  # log p of successor k: (1 − e)·q_k

    def begin(self, rows: np.ndarray) -> None:
        """Start each of `rows` on its next sequence: its topic (the header) and the START state."""
        cfg = self.cfg
        index = self.next_index[rows]
        self.next_index[rows] += 1
        self.prefix[rows] = prefix = _extend_array(self.split_key, index.astype(np.uint64))
        u = _unit(_extend_array(prefix, 0xA11))
        self.topic[rows] = np.minimum((u * cfg.num_topics).astype(np.int64), cfg.num_topics - 1)
        self.state[rows] = cfg.vocab_size
        self.position[rows] = 0  # `step` clears at_header: these rows walk from the next position

    def step(self, walking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row's next token and its oracle log-probability, as `sequences` draws them:
        `</S>` with probability e (forced at max_len with p = 1), else successor k with p ∝ k^-β.
        Of the `walking` rows (the others are at a header, their draw discarded), those that
        emitted `</S>` are at a header next and the others move to the token they emitted."""
        cfg = self.cfg
        at_position = _extend_array(self.prefix, self.position)
        at_cap = self.position == cfg.max_len
        stop = (_unit(_extend_array(at_position, 0xE05)) < cfg.eos_prob) | at_cap
        u = _unit(_extend_array(at_position, 0x5CC))
        choice = _choose(self.row_cdf, u)
        row = (self.topic * (cfg.vocab_size + 1) + self.state) * cfg.fanout
        word = self.successors[row + choice]
        token = np.where(stop, cfg.eos_id, word)
        logp = np.where(stop, np.where(at_cap, 0.0, self.log_eos), self.log_word[choice])
        moved = walking & ~stop
        self.state = np.where(moved, word, self.state)
        self.position += moved
        self.at_header = walking & stop
        return token, logp


def _choose(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The slot k of each uniform u, as `sequences` picks it: min(searchsorted(cdf, u, "right"),
    K − 1), i.e. the number of cdf entries <= u, capped. For a few slots, counting by comparisons
    gives the same integers faster than a binary search per element."""
    if cdf.size > 8:
        return np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1)
    count = np.zeros(u.shape, dtype=np.intp)
    for edge in cdf:
        count += u >= edge
    return np.minimum(count, cdf.size - 1)


def _check_shape(batch_size: int, seq_len: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
