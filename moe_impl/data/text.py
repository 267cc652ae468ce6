"""Tokenized plain text as a corpus: WikiText-103 (docs/data.md) or any train/valid/test text files.

Layouts, under `root`: `wiki.{train,valid,test}.tokens` (WikiText; also found in `root/wikitext-103/`
or `root/wikitext-2/`), else `{train,valid,test}.txt`. The train and test files are required, valid
is optional (an error only when asked for). Every split is read when the corpus opens, so a file
that is not UTF-8 (the error names its line and byte offset) or holds no token stops a run before
it trains, not at its final evaluation.

Tokens are the whitespace-separated words of each line plus one `<eos>` per line (one end-of-line
token per line, as fairseq and Transformer-XL count WikiText-103; docs/data.md). Empty lines count too, each as a
lone `<eos>`: fairseq-preprocess logs wiki.test.tokens as "4358 sents, 245569 tokens", i.e. all
4,358 lines, empty or not, and 245,569 is the published test size. `skip_empty_lines=True` drops
them instead (fewer, mostly easy `<eos>` targets; perplexities are then not comparable). Each
split's stream starts with one extra `<eos>` (the file begins as if after a line end), so every
token of the file is a target: scored count = token count. Perplexity is per token.

The vocabulary comes from the training file only: tokens seen at least `min_count` times, at most
`max_vocab` entries (counting `<eos>` and `<unk>`), ids sorted by training frequency (count
descending, then the token); everything else maps to `<unk>`. WikiText already has `<unk>` in the
text, which then simply is a frequent token.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moe_impl.data.stream import StreamCorpus, count_scored

LAYOUTS = {"wikitext": "wiki.{split}.tokens", "plain": "{split}.txt"}
_WIKITEXT_DIRS = ("wikitext-103", "wikitext-2")


def read_lines(path: Path, newline: str | None = None) -> Iterator[str]:
    """Lines of a UTF-8 text file (`newline` as for `open`); a decoding error is a ValueError
    naming the file, the line and the byte offset of the first bad byte (`utf8_error`)."""
    try:
        with path.open(encoding="utf-8", newline=newline) as f:
            yield from f
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def utf8_error(path: Path) -> ValueError:
    """The one-line error for the first byte of `path` that is not UTF-8: file, line (counted in
    '\\n'), byte offset and the byte. Only called once decoding has failed; reads by line, and no
    '\\n' byte occurs inside a multi-byte UTF-8 sequence, so each line decodes on its own."""
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = line[err.start : err.start + 1]
                return ValueError(
                    f"{path} is not UTF-8 text: line {number}, byte {offset + err.start} "
                    f"(0x{bad.hex()}: {err.reason}); re-encode it as UTF-8"
                )
            offset += len(line)
    return ValueError(f"{path} is not UTF-8 text")  # not reached for a file that failed


def _find_layout(root: Path) -> tuple[str, Path]:
    """(layout name, folder holding the split files)."""
    if not root.is_dir():
        raise ValueError(f"text corpus folder {root} does not exist")
    for folder in (root, *(root / name for name in _WIKITEXT_DIRS)):
        if (folder / LAYOUTS["wikitext"].format(split="train")).is_file():
            return "wikitext", folder
    if (root / LAYOUTS["plain"].format(split="train")).is_file():
        return "plain", root
    expected = [root / "wiki.train.tokens", root / "wikitext-103" / "wiki.train.tokens"]
    raise ValueError(
        f"no training file in {root}: expected {expected[0]}, {expected[1]} or "
        f"{root / 'train.txt'} (docs/data.md)"
    )


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} not found: expected the file {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    return path


class TextCorpus(StreamCorpus):
    """The `Corpus` of a tokenized text folder (moe_impl/data/base.py): one stream per split,
    training windows by step and evaluation passes that score every token once."""

    name = "text"
    ids_by_frequency = True

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        min_count: int = 1,
        max_vocab: int | None = None,
        eos: str = "<eos>",
        unk: str = "<unk>",
        skip_empty_lines: bool = False,
    ) -> None:
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive integer, got {min_count!r}")
        if max_vocab is not None and (
            isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 2
        ):
            raise ValueError(f"max_vocab must be None or an integer >= 2, got {max_vocab!r}")
        if not eos or not unk or eos == unk or len(eos.split()) != 1 or len(unk.split()) != 1:
            raise ValueError(
                f"eos and unk must be two different single tokens, got {eos!r} and {unk!r}"
            )
        self.root = Path(root).expanduser()
        self.min_count, self.max_vocab = min_count, max_vocab
        self.skip_empty_lines = skip_empty_lines
        self.layout, self.folder = _find_layout(self.root)
        pattern = LAYOUTS[self.layout]
        self.files: dict[str, Path | None] = {}
        for split in ("train", "valid", "test"):
            path = self.folder / pattern.format(split=split)
            if split == "valid" and not path.exists():
                self.files[split] = None
            else:
                self.files[split] = _check_file(path, f"{split} file")
        self._streams: dict[str, np.ndarray] = {}
        self._build_vocab_and_train(eos, unk)
        # every split encoded now: a file that does not decode stops a run before it trains, not
        # at the final evaluation (the held-out files are small beside the training file)
        for split in ("valid", "test"):
            if self.files[split] is not None:
                self.stream(split)

    def _lines(self, path: Path) -> Iterator[list[str]]:
        """The tokens of each line, without `<eos>`; empty lines dropped if `skip_empty_lines`."""
        for line in read_lines(path):
            words = line.split()
            if words or not self.skip_empty_lines:
                yield words

    def _build_vocab_and_train(self, eos: str, unk: str) -> None:
        """One pass over the training file: provisional ids in order of first appearance, then
        counts, the frequency-sorted vocabulary, and the provisional -> final id remap."""
        path = self.files["train"]
        assert path is not None  # the train file is required (checked in __init__)
        first_seen: dict[str, int] = {eos: 0}
        add = first_seen.setdefault
        ids = array("i", [0])  # the leading <eos> (module docstring)
        for words in self._lines(path):
            ids.extend([add(w, len(first_seen)) for w in words])
            ids.append(0)
        provisional_N = np.frombuffer(ids, dtype=np.intc)
        if provisional_N.size < 2:
            raise ValueError(f"train file {path} holds no token")
        counts = np.bincount(provisional_N[1:], minlength=len(first_seen))
        words = list(first_seen)
        ranked = sorted(
            (
                (w, int(c))
                for w, c in zip(words, counts, strict=True)
                if c >= self.min_count and w not in (eos, unk)
            ),
            key=lambda wc: (-wc[1], wc[0]),
        )
        if self.max_vocab is not None:
            ranked = ranked[: self.max_vocab - 2]
        eos_count = int(counts[0])
        unk_count = int(counts.sum()) - eos_count - sum(c for _, c in ranked)
        ranked = sorted(
            [*ranked, (eos, eos_count), (unk, unk_count)], key=lambda wc: (-wc[1], wc[0])
        )
        self.vocab = [w for w, _ in ranked]
        self.token_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)
        self.eos_id, self.unk_id = self.token_to_id[eos], self.token_to_id[unk]
        remap = np.full(len(words), self.unk_id, dtype=np.int32)
        for w, i in self.token_to_id.items():
            if w in first_seen:
                remap[first_seen[w]] = i
        self._streams["train"] = remap[provisional_N]

    def stream(self, split: str) -> np.ndarray:
        """The int32 token stream of `split`: `<eos>`, then each line's tokens and `<eos>`."""
        if split not in self.files:
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        path = self.files[split]
        if path is None:
            expected = self.folder / LAYOUTS[self.layout].format(split=split)
            raise ValueError(f"no {split} file: expected the file {expected}")
        if split not in self._streams:
            get, unk_id = self.token_to_id.get, self.unk_id
            ids = array("i", [self.eos_id])
            for words in self._lines(path):
                ids.extend([get(w, unk_id) for w in words])
                ids.append(self.eos_id)
            if len(ids) < 2:
                raise ValueError(f"{split} file {path} holds no token")
            self._streams[split] = np.frombuffer(ids, dtype=np.intc).astype(np.int32)
        return self._streams[split]

    # --- the Corpus protocol ------------------------------------------------------------------

    def describe(self) -> dict:
        test = self.stream("test")
        scored = count_scored(test)
        valid = None if self.files["valid"] is None else count_scored(self.stream("valid"))
        return {
            "corpus": self.name,
            "root": str(self.folder),
            "layout": self.layout,
            "train_tokens": int(self.stream("train").size - 1),
            "valid_tokens": valid,
            "test_scored_tokens": scored,
            "test_unk_rate": float(np.count_nonzero(test[1:] == self.unk_id)) / scored,
            "vocab_size": self.vocab_size,
            "min_count": self.min_count,
            "max_vocab": self.max_vocab,
            "empty_lines": "skipped" if self.skip_empty_lines else "one <eos> each",
            "perplexity": "per token: whitespace tokens plus one <eos> per line (docs/data.md)",
        }
