"""LM1BCorpus on a tiny fixture in the exact archive layout (docs/data.md): counts, vocabularies,
the heldout trap file, shuffling, caching and error messages."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    LM1B_TEST,
    LM1B_WORDS,
    SCORED_TEST,
    lm1b_train_sentences,
    make_archive,
    write_lines,
)

from moe_impl.data import LM1BCorpus
from moe_impl.data import lm1b as lm1b_module
from moe_impl.data.lm1b import ARCHIVE_DIR, HELDOUT_DIR, TEST_FILE, TRAIN_DIR, VALID_FILE
from moe_impl.data.stream import train_windows


def _quiet(root, **kwargs) -> LM1BCorpus:
    kwargs.setdefault("max_train_shards", 3)
    return LM1BCorpus(root, **kwargs)


def _sentences(stream: np.ndarray, bos: int) -> list[tuple[int, ...]]:
    starts = np.flatnonzero(stream == bos)
    ends = [*starts[1:], stream.size]
    return [tuple(int(t) for t in stream[a:b]) for a, b in zip(starts, ends, strict=True)]


@pytest.fixture
def archive(tmp_path) -> Path:
    return make_archive(tmp_path / "data")


def test_counts_unk_and_bos_never_scored(archive):
    corpus = _quiet(archive, cache_dir=archive.parent / "cache")
    test = corpus.stream("test")
    assert test.size == SCORED_TEST + len(LM1B_TEST)  # plus one <S> per sentence
    scored = []
    for batch in corpus.eval_batches("test", 2, 4):
        scored.extend(batch.targets[batch.scored].tolist())
        assert not batch.scored[batch.targets == corpus.bos_id].any()
        assert batch.oracle_logp is None
    assert len(scored) == SCORED_TEST
    assert scored.count(corpus.unk_id) == 3  # zzyzx, qqq, U.S.
    assert scored.count(corpus.eos_id) == len(LM1B_TEST)
    facts = corpus.describe()
    assert facts["test_scored_tokens"] == SCORED_TEST
    assert facts["test_unk_rate"] == pytest.approx(3 / SCORED_TEST)
    assert facts["train_tokens"] == sum(
        len(s.split()) + 2 for n in (1, 2, 3) for s in lm1b_train_sentences(n)
    )
    assert facts["train_shards"] == 3 and facts["corpus"] == "lm1b"
    assert corpus.floor_nats() is None and corpus.carries_state


def test_trap_file_does_not_change_counts(tmp_path):
    with_trap = _quiet(make_archive(tmp_path / "a", trap=True), cache_dir=tmp_path / "c1")
    without = _quiet(make_archive(tmp_path / "b", trap=False), cache_dir=tmp_path / "c2")
    keys = ("test_scored_tokens", "train_tokens", "vocab_size", "train_shards")
    assert {k: with_trap.describe()[k] for k in keys} == {k: without.describe()[k] for k in keys}
    assert next(with_trap.eval_batches("valid", 1, 100)).scored.sum() == 5 + 5


def test_parent_folder_or_archive_folder(archive):
    a = _quiet(archive, cache_dir=archive.parent / "cache")
    b = _quiet(archive.parent, cache_dir=archive.parent / "cache")
    assert a.folder == b.folder == archive
    assert np.array_equal(a.stream("train"), b.stream("train"))


def test_rebuilt_vocabulary(archive):
    corpus = _quiet(archive, cache_dir=archive.parent / "cache")
    assert corpus.vocab_source.startswith("rebuilt from 3 training shards")
    assert set(LM1B_WORDS) <= set(corpus.vocab)
    assert {"<S>", "</S>", "<UNK>"} <= set(corpus.vocab)
    assert "rare1" in corpus.vocab  # seen 3 times: twice in shard 1, once in shard 3
    assert not {"rare0", "rare2", "rare3"} & set(corpus.vocab)  # seen once each
    assert corpus.ids_by_frequency and len(set(corpus.vocab)) == corpus.vocab_size
    counts = np.bincount(corpus.stream("train"), minlength=corpus.vocab_size)
    assert (np.diff(counts) <= 0).all()  # id order is frequency rank in the training stream


def test_vocab_2016_format(archive):
    tokens = ["</S>", "<S>", "<UNK>", "the", "cat", ".", "U.S."]
    write_lines(archive / "vocab-2016-09-10.txt", [*tokens, "!!!MAXTERMID"])
    corpus = _quiet(archive, cache_dir=archive.parent / "cache")
    assert corpus.vocab == tokens and corpus.vocab_size == 7
    assert corpus.vocab_source == str(archive / "vocab-2016-09-10.txt")
    assert (corpus.bos_id, corpus.eos_id, corpus.unk_id) == (1, 0, 2)
    test = corpus.stream("test")
    assert int((test == corpus.unk_id).sum()) == 9  # sat on mat, a zzyzx dog ran , qqq


def test_word_count_format_gets_eos(archive):
    lines = ["the 50", "<S> 30", "cat 20", ". 20", "<UNK> 0"]
    write_lines(archive.parent / "1b_word_vocab.txt", lines)  # found in the parent root as well
    corpus = _quiet(archive.parent, cache_dir=archive.parent / "cache")
    assert corpus.vocab == ["the", "<S>", "</S>", "cat", ".", "<UNK>"]
    assert corpus.ids_by_frequency
    unsorted = archive.parent / "mine.txt"
    write_lines(unsorted, ["<S> 30", "cat 2", "the 50", "<UNK> 0"])
    assert not _quiet(archive, vocab_file=unsorted).ids_by_frequency


def test_explicit_vocab_file_wins_and_bad_lines(archive):
    write_lines(archive / "vocab-2016-09-10.txt", ["</S>", "<S>", "<UNK>", "the"])
    mine = archive.parent / "mine.txt"
    write_lines(mine, ["</S>", "<S>", "<UNK>", "cat"])
    assert _quiet(archive, vocab_file=mine).vocab[-1] == "cat"
    write_lines(mine, ["the 5", "cat five"])
    with pytest.raises(ValueError, match=r"mine.txt, line 2: expected 'word count'"):
        _quiet(archive, vocab_file=mine)


def test_shuffle_is_deterministic_by_seed(archive):
    cache = archive.parent / "cache"
    a = _quiet(archive, seed=1, cache_dir=cache).stream("train")
    b = _quiet(archive, seed=1, cache_dir=None).stream("train")  # default cache: a fresh folder
    c = _quiet(archive, seed=2, cache_dir=cache).stream("train")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    bos = _quiet(archive, cache_dir=cache).bos_id
    assert sorted(_sentences(a, bos)) == sorted(_sentences(c, bos))  # the same sentences
    assert a.dtype == np.int32


def test_cache_reused_and_invalidated(archive, monkeypatch):
    cache = archive.parent / "cache"
    first = _quiet(archive, cache_dir=cache)
    train, test = first.stream("train"), first.stream("test")
    assert len(list(cache.glob("lm1b-train-*.npy"))) == 1
    assert len(list(cache.glob("lm1b-vocab-*.txt"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(lm1b_module, "_encode_files", no_encoding)
    monkeypatch.setattr(lm1b_module, "build_vocab", no_encoding)
    second = _quiet(archive, cache_dir=cache)
    assert isinstance(second.stream("train"), np.memmap)
    assert np.array_equal(second.stream("train"), train)
    assert np.array_equal(second.stream("test"), test)
    monkeypatch.undo()

    shard = archive / TRAIN_DIR / "news.en-00002-of-00100"
    write_lines(shard, [*lm1b_train_sentences(2), "the cat ran ."])
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    third = _quiet(archive, cache_dir=cache)
    assert third.stream("train").size == train.size + 6
    assert len(list(cache.glob("lm1b-train-*.npy"))) == 2


def test_default_cache_dir_and_unwritable(archive):
    corpus = _quiet(archive)
    corpus.stream("test")
    assert corpus.cache_dir == archive / ".moe_cache"
    assert list((archive / ".moe_cache").glob("lm1b-test-*.npy"))
    blocker = archive.parent / "a_file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="not writable"):
        corpus = _quiet(archive, cache_dir=blocker / "sub")
    assert corpus.cache_dir is None
    assert corpus.describe()["test_scored_tokens"] == SCORED_TEST


def test_train_batch_matches_stream_windows(archive):
    corpus = _quiet(archive, cache_dir=archive.parent / "cache")
    steps = corpus.steps_per_epoch(2, 5)
    assert steps == (corpus.stream("train").size - 1) // 2 // 5
    for step in (0, 1, steps, steps + 1):
        got = corpus.train_batch(step, 2, 5)
        want = train_windows(corpus.stream("train"), step, 2, 5, {corpus.bos_id})
        assert all(np.array_equal(g, w) for g, w in zip(got[:3], want[:3], strict=True))
        assert not got.scored[got.targets == corpus.bos_id].any()
    with pytest.raises(ValueError, match="too small for batch_size x seq_len"):
        corpus.train_batch(0, 64, 64)


def test_shard_count_warning(archive):
    with pytest.warns(UserWarning, match="found 3 of the 99 LM1B training shards"):
        LM1BCorpus(archive, cache_dir=archive.parent / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = LM1BCorpus(archive, cache_dir=archive.parent / "cache", max_train_shards=2)
    assert [p.name for p in corpus.train_files] == [
        "news.en-00001-of-00100",
        "news.en-00002-of-00100",
    ]


def test_layout_errors(tmp_path):
    with pytest.raises(ValueError, match=r"root folder .*nowhere does not exist"):
        LM1BCorpus(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=rf"expected .*{ARCHIVE_DIR}/{TRAIN_DIR}"):
        LM1BCorpus(tmp_path)
    (tmp_path / TRAIN_DIR).mkdir()
    (tmp_path / TRAIN_DIR / "news.en-00000-of-00100").write_text("not a training shard\n")
    with pytest.raises(ValueError, match=r"no LM1B training shard in .*news.en-00001-of-00100"):
        LM1BCorpus(tmp_path)
    write_lines(tmp_path / TRAIN_DIR / "news.en-00007-of-00100", ["a b c"])
    with pytest.raises(ValueError, match=rf"test shard not found: .*{HELDOUT_DIR}/{TEST_FILE}"):
        LM1BCorpus(tmp_path, max_train_shards=1)


def test_empty_and_missing_files(tmp_path):
    top = make_archive(tmp_path, valid=False)
    corpus = _quiet(top, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=rf"no LM1B valid shard: expected the file .*{VALID_FILE}"):
        corpus.eval_batches("valid", 1, 1)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        corpus.eval_batches("train", 1, 1)
    (top / HELDOUT_DIR / TEST_FILE).write_text("")
    with pytest.raises(ValueError, match=rf"test shard .*{TEST_FILE} is empty"):
        _quiet(top)
    (top / HELDOUT_DIR / TEST_FILE).write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{TEST_FILE} holds no sentence"):
        _quiet(top, cache_dir=tmp_path / "cache").stream("test")
    (top / TRAIN_DIR / "news.en-00002-of-00100").write_text("")
    with pytest.raises(ValueError, match=r"training shard .*news.en-00002-of-00100 is empty"):
        _quiet(top)
    with pytest.raises(ValueError, match="max_train_shards must be None or in"):
        LM1BCorpus(top, max_train_shards=0)
