"""The TopicMarkov synthetic corpus: exact floor, oracle log-probabilities, random access, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_impl.data import TopicMarkov, TopicMarkovConfig

SMALL = TopicMarkovConfig(vocab_size=64, num_topics=8, fanout=3, eos_prob=0.1, seed=3)


def test_floor_matches_closed_form_and_data_md():
    corpus = TopicMarkov(TopicMarkovConfig())  # data.md §3.2 sanity config: 1.3986 nats
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


def test_rows_have_distinct_successors():
    table = TopicMarkov(SMALL).successors
    assert table.shape == (8, 65, 3)
    assert (np.sort(table, axis=-1)[..., 1:] != np.sort(table, axis=-1)[..., :-1]).all()


def test_random_access_and_disjoint_splits():
    corpus = TopicMarkov(SMALL)
    _, together, _ = corpus.sequences("train", np.arange(10))
    _, alone, _ = corpus.sequences("train", np.array([7]))
    assert np.array_equal(together[7], alone[0])
    _, test, _ = corpus.sequences("test", np.arange(10))
    assert sum(np.array_equal(a, b) for a, b in zip(together, test, strict=True)) < 5
    again = TopicMarkov(SMALL).sequences("train", np.arange(10))[1]
    assert all(np.array_equal(a, b) for a, b in zip(together, again, strict=True))


def test_batch_layout():
    corpus = TopicMarkov(SMALL)
    batch = corpus.batch("valid", step=2, batch_size=4, seq_len=SMALL.max_len + 1)
    topics, tokens, logps = corpus.sequences("valid", np.arange(8, 12))
    for row, (t, seq, lp) in enumerate(zip(topics, tokens, logps, strict=True)):
        n = seq.size
        assert batch.inputs[row, 0] == SMALL.vocab_size + 1 + t  # the topic header
        assert np.array_equal(batch.inputs[row, 1:n], seq[:-1])
        assert np.array_equal(batch.targets[row, :n], seq)
        assert batch.scored[row].sum() == n
        assert np.allclose(batch.oracle_logp[row, :n], lp)
    with pytest.raises(ValueError, match="seq_len"):
        corpus.batch("valid", 0, 4, seq_len=SMALL.max_len)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 0}, "data.vocab_size"),
        ({"fanout": 600}, "data.fanout=600 must be <= data.vocab_size=512"),
        ({"eos_prob": 1.0}, "data.eos_prob"),
        ({"zipf_s": -1.0}, "data.zipf_s"),
        ({"num_topics": 100_000}, "successor entries"),
    ],
)
def test_bad_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopicMarkovConfig(**kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        TopicMarkov(SMALL).sequences("dev", np.arange(2))
