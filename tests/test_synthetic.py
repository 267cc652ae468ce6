"""The TopicMarkov synthetic corpus: exact floor, oracle log-probabilities, random access, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_impl.data import TopicMarkov, TopicMarkovConfig

SMALL = TopicMarkovConfig(vocab_size=64, num_topics=8, fanout=3, eos_prob=0.1, seed=3)


def test_floor_matches_closed_form_and_data_md():
    corpus = TopicMarkov(TopicMarkovConfig())  # the default config: floor 1.3986 nats
    assert corpus.floor_nats() == pytest.approx(1.3986, abs=5e-5)
    _, tokens, logps = corpus.sequences("test", np.arange(20_000))
    empirical = -sum(lp.sum() for lp in logps) / sum(t.size for t in tokens)
    assert abs(empirical - corpus.floor_nats()) < 0.01


def test_oracle_logp_is_the_table_probability():
    corpus = TopicMarkov(SMALL)
    topics, tokens, logps = corpus.sequences("train", np.arange(200))
    e, q = SMALL.eos_prob, corpus.row_probs
    for t, seq, lp in zip(topics, tokens, logps, strict=True):
        assert seq[-1] == SMALL.eos_id and (seq[:-1] < SMALL.vocab_size).all()
        state = SMALL.vocab_size  # START
        for token, got in zip(seq[:-1], lp[:-1], strict=True):
            k = list(corpus.successors[t, state]).index(token)
            assert got == pytest.approx(math.log1p(-e) + math.log(q[k]))
            state = token
        assert lp[-1] == pytest.approx(math.log(e))


def test_rows_have_distinct_successors_with_zipf_probabilities():
    corpus = TopicMarkov(SMALL)
    table = corpus.successors
    assert table.shape == (8, 65, 3)  # topics x (words + START) x fanout
    assert (np.sort(table, axis=-1)[..., 1:] != np.sort(table, axis=-1)[..., :-1]).all()
    assert table.min() >= 0 and table.max() < SMALL.vocab_size  # words only: EOS is separate
    zipf = np.arange(1, SMALL.fanout + 1) ** -SMALL.zipf_s
    np.testing.assert_allclose(corpus.row_probs, zipf / zipf.sum())
    assert not np.array_equal(table[0], table[1])  # topics differ


def test_clusters_share_their_leading_slots_and_keep_the_floor():
    """Topic t's first K_s successors are its cluster's (t mod C), the other K − K_s its own and
    distinct from them; the floor is the unclustered closed form, and the oracle still scores it."""
    cfg = TopicMarkovConfig(
        vocab_size=64, num_topics=8, fanout=4, num_clusters=2, shared_fanout=2, seed=3
    )
    corpus = TopicMarkov(cfg)
    table = corpus.successors
    for t in range(8):
        assert np.array_equal(table[t, :, :2], table[t % 2, :, :2])
    assert not np.array_equal(table[0, :, :2], table[1, :, :2])  # clusters differ
    assert not np.array_equal(table[0, :, 2:], table[2, :, 2:])  # topics of a cluster differ
    assert (np.sort(table, axis=-1)[..., 1:] != np.sort(table, axis=-1)[..., :-1]).all()
    plain = TopicMarkov(TopicMarkovConfig(vocab_size=64, num_topics=8, fanout=4, seed=3))
    assert corpus.floor_nats() == plain.floor_nats()
    _, tokens, logps = corpus.sequences("test", np.arange(20_000))
    empirical = -sum(lp.sum() for lp in logps) / sum(t.size for t in tokens)
    assert abs(empirical - corpus.floor_nats()) < 0.01


def test_no_shared_slots_is_the_unclustered_corpus():
    """shared_fanout = 0 draws exactly the tables it always drew, whatever num_clusters says."""
    base = dict(vocab_size=64, num_topics=8, fanout=3, seed=3)
    plain = TopicMarkov(TopicMarkovConfig(**base)).successors
    assert np.array_equal(plain, TopicMarkov(TopicMarkovConfig(**base, num_clusters=4)).successors)


def test_random_access_and_disjoint_splits():
    corpus = TopicMarkov(SMALL)
    _, together, _ = corpus.sequences("train", np.arange(10))
    _, alone, _ = corpus.sequences("train", np.array([7]))
    assert np.array_equal(together[7], alone[0])
    _, test, _ = corpus.sequences("test", np.arange(10))
    assert sum(np.array_equal(a, b) for a, b in zip(together, test, strict=True)) < 5
    again = TopicMarkov(SMALL).sequences("train", np.arange(10))[1]
    assert all(np.array_equal(a, b) for a, b in zip(together, again, strict=True))


def _unpack(batch, row):
    """Row `row` of a batch as the sequences it packs: [(header, tokens, oracle logps)]."""
    stream = np.append(batch.inputs[row], batch.targets[row, -1])
    logp = np.append(0.0, batch.oracle_logp[row])
    header = np.append(True, ~batch.scored[row])
    starts = np.flatnonzero(header)
    ends = np.append(starts[1:], stream.size)
    return [
        (stream[a], stream[a + 1 : b], logp[a + 1 : b]) for a, b in zip(starts, ends, strict=True)
    ]


def test_train_batch_packs_whole_sequences_by_step():
    corpus = TopicMarkov(SMALL)
    batch = corpus.train_batch(step=2, batch_size=3, seq_len=40)
    assert batch.inputs.shape == batch.targets.shape == (3, 40)
    assert np.array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for row in range(3):
        first = (2 * 3 + row) * 41  # the row's own range of train sequences
        packed = _unpack(batch, row)
        topics, tokens, logps = corpus.sequences("train", np.arange(first, first + len(packed)))
        for (header, seq, lp), t, want, want_lp in zip(packed, topics, tokens, logps, strict=True):
            assert header == SMALL.vocab_size + 1 + t
            assert np.array_equal(seq, want[: seq.size])  # the last one is cut at the row's end
            assert np.allclose(lp, want_lp[: seq.size])
    again = TopicMarkov(SMALL).train_batch(step=2, batch_size=3, seq_len=40)
    assert all(np.array_equal(a, b) for a, b in zip(batch, again, strict=True))


def test_eval_batches_score_every_token_once_whatever_the_shape():
    corpus = TopicMarkov(SMALL)
    totals = set()
    for batch_size, seq_len in [(1, 500), (4, 16), (7, 33)]:
        batches = list(corpus.eval_batches("test", batch_size, seq_len, max_tokens=2000))
        scored = sum(int(b.scored.sum()) for b in batches)
        oracle = sum(float(b.oracle_logp[b.scored].sum()) for b in batches)
        totals.add((scored, round(oracle, 6)))
        for b in batches:  # windows continue their rows: state carried across batches
            assert b.inputs.shape == (batch_size, seq_len)
    ((scored, oracle),) = totals
    _, tokens, logps = corpus.sequences("test", np.arange(400))
    lengths = np.cumsum([t.size for t in tokens])
    n = int(np.searchsorted(lengths, 2000)) + 1  # whole sequences, >= 2000 tokens
    assert scored == lengths[n - 1] >= 2000
    assert oracle == pytest.approx(sum(lp.sum() for lp in logps[:n]))


def test_eval_batches_need_a_budget_and_a_split():
    corpus = TopicMarkov(SMALL)
    with pytest.raises(ValueError, match=r"eval\.tokens"):
        next(corpus.eval_batches("test", 2, 8))
    with pytest.raises(ValueError, match="split"):
        next(corpus.eval_batches("train", 2, 8, max_tokens=10))
    with pytest.raises(ValueError, match="seq_len"):
        corpus.train_batch(0, 2, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 0}, "data.vocab_size"),
        ({"fanout": 600}, "data.fanout=600 must be <= data.vocab_size=512"),
        ({"eos_prob": 1.0}, "data.eos_prob"),
        ({"zipf_s": -1.0}, "data.zipf_s"),
        ({"num_topics": 100_000}, "successor entries"),
        ({"shared_fanout": 5}, r"data.shared_fanout must be an integer in \[0, data.fanout=4\]"),
        ({"num_clusters": 65}, "data.num_clusters=65 must be <= data.num_topics=64"),
        ({"num_clusters": 0}, "data.num_clusters"),
    ],
)
def test_bad_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopicMarkovConfig(**kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        TopicMarkov(SMALL).sequences("dev", np.arange(2))
