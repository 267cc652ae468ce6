"""TextCorpus on tiny WikiText-103 and plain-text fixtures (docs/data.md): layouts, one `<eos>` per
line, the train-only frequency-sorted vocabulary, every test token scored once, error messages."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import WIKI_TEST, WIKI_TRAIN, WIKI_VALID, make_wikitext, write_lines

from moe_impl.data import TextCorpus


def _tokens(lines: list[str], skip_empty: bool = False) -> list[str]:
    return [t for line in lines if line.split() or not skip_empty for t in [*line.split(), "<eos>"]]


def _decode(corpus: TextCorpus, ids) -> list[str]:
    return [corpus.vocab[i] for i in ids]


@pytest.mark.parametrize("skip_empty", [False, True])
def test_every_test_token_scored_once(tmp_path, skip_empty):
    corpus = TextCorpus(make_wikitext(tmp_path), skip_empty_lines=skip_empty)
    want = [t if t in corpus.token_to_id else "<unk>" for t in _tokens(WIKI_TEST, skip_empty)]
    for batch_size, seq_len in [(1, 1), (1, 50), (2, 3), (3, 4), (5, 2)]:
        targets = [
            t for b in corpus.eval_batches("test", batch_size, seq_len) for t in b.targets[b.scored]
        ]
        assert sorted(_decode(corpus, targets)) == sorted(want)
        if batch_size == 1:
            assert _decode(corpus, targets) == want  # stream order
    assert corpus.describe()["test_scored_tokens"] == len(want)
    assert _decode(corpus, corpus.stream("train")[1:]) == _tokens(WIKI_TRAIN, skip_empty)


def test_empty_lines_give_one_eos_each(tmp_path):
    corpus = TextCorpus(make_wikitext(tmp_path))
    test = corpus.stream("test")
    assert test.size == 1 + sum(len(line.split()) + 1 for line in WIKI_TEST)  # leading <eos>
    assert int((test == corpus.eos_id).sum()) == 1 + len(WIKI_TEST)
    skipping = TextCorpus(make_wikitext(tmp_path), skip_empty_lines=True)
    assert int((skipping.stream("test") == skipping.eos_id).sum()) == 1 + 2
    assert corpus.describe()["empty_lines"] == "one <eos> each"


def test_vocabulary_sorted_by_train_frequency(tmp_path):
    corpus = TextCorpus(make_wikitext(tmp_path))
    counts = np.bincount(corpus.stream("train")[1:], minlength=corpus.vocab_size)
    assert (np.diff(counts) <= 0).all() and corpus.ids_by_frequency
    assert corpus.vocab[:3] == ["<eos>", "the", "."]  # <eos> x6, the x4, then "." wins a 4-way tie
    assert "bird" not in corpus.vocab  # train only
    test = corpus.stream("test")
    assert int((test == corpus.unk_id).sum()) == 2  # Other, bird
    assert corpus.describe()["test_unk_rate"] == pytest.approx(2 / (test.size - 1))


def test_min_count_and_max_vocab(tmp_path):
    folder = make_wikitext(tmp_path)
    corpus = TextCorpus(folder, min_count=2)
    assert set(corpus.vocab) == {"<eos>", "the", "sat", "on", ".", "=", "<unk>"}
    unk_count = int((corpus.stream("train") == corpus.unk_id).sum())
    assert unk_count == 7  # Title cat mat dog a <unk> end
    small = TextCorpus(folder, max_vocab=4)
    assert small.vocab == ["<unk>", "<eos>", "the", "."]  # <unk> takes the 13 cut tokens
    counts = np.bincount(small.stream("train")[1:], minlength=4)
    assert (np.diff(counts) <= 0).all()


def test_layouts(tmp_path):
    folder = make_wikitext(tmp_path / "a")
    by_parent = TextCorpus(tmp_path / "a")
    by_folder = TextCorpus(folder)
    assert by_parent.folder == by_folder.folder == folder and by_parent.layout == "wikitext"
    assert np.array_equal(by_parent.stream("train"), by_folder.stream("train"))
    for split, lines in (("train", WIKI_TRAIN), ("valid", WIKI_VALID), ("test", WIKI_TEST)):
        write_lines(tmp_path / "b" / f"{split}.txt", lines)
    plain = TextCorpus(tmp_path / "b")
    assert plain.layout == "plain" and plain.name == "text" and plain.carries_state
    assert np.array_equal(plain.stream("test"), by_folder.stream("test"))
    assert plain.describe()["valid_tokens"] == 4 and plain.floor_nats() is None


def test_train_batch_and_steps(tmp_path):
    corpus = TextCorpus(make_wikitext(tmp_path))
    n = corpus.stream("train").size
    assert corpus.steps_per_epoch(2, 3) == (n - 1) // 2 // 3
    batch = corpus.train_batch(1, 2, 3)
    assert batch.scored.all() and batch.oracle_logp is None
    row_len = (n - 1) // 2
    stream = corpus.stream("train")
    for row in range(2):  # step 1 reads positions 3..5 of each row, and predicts 4..6
        start = row * row_len + 3
        assert np.array_equal(batch.inputs[row], stream[start : start + 3])
        assert np.array_equal(batch.targets[row], stream[start + 1 : start + 4])
    with pytest.raises(ValueError, match="too small for batch_size x seq_len"):
        corpus.train_batch(0, 8, 8)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"text corpus folder .*nowhere does not exist"):
        TextCorpus(tmp_path / "nowhere")
    with pytest.raises(
        ValueError, match=r"expected .*wiki.train.tokens, .*wikitext-103.*train.txt"
    ):
        TextCorpus(tmp_path)
    folder = make_wikitext(tmp_path, valid=False)
    corpus = TextCorpus(folder)
    with pytest.raises(ValueError, match=r"no valid file: expected the file .*wiki.valid.tokens"):
        corpus.eval_batches("valid", 1, 1)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        corpus.eval_batches("train", 1, 1)
    (folder / "wiki.test.tokens").unlink()
    with pytest.raises(ValueError, match=r"test file not found: expected the file .*wiki.test"):
        TextCorpus(folder)
    (folder / "wiki.test.tokens").write_text("")
    with pytest.raises(ValueError, match=r"test file .*wiki.test.tokens is empty"):
        TextCorpus(folder)
    (folder / "wiki.test.tokens").write_text("\n \n")
    with pytest.raises(ValueError, match=r"test file .*wiki.test.tokens holds no token"):
        TextCorpus(folder, skip_empty_lines=True).stream("test")
    with pytest.raises(ValueError, match="min_count must be a positive integer"):
        TextCorpus(folder, min_count=0)
    with pytest.raises(ValueError, match="eos and unk must be two different single tokens"):
        TextCorpus(folder, eos="<x>", unk="<x>")
