"""LM1B (the One Billion Word benchmark), the paper's main language-modelling corpus (docs/data.md).

Layout (docs/data.md), under `root` or `root/1-billion-word-language-modeling-benchmark-r13output/`:
train = `training-monolingual.tokenized.shuffled/news.en-000NN-of-00100`, NN = 1 .. 99; test =
`heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050` only (the set of Chelba et
al. 2013, Jozefowicz et al. 2016 and the paper, App. C.1); valid = `news.en.heldout-00001-…`.
Files are named one by one, never globbed: the heldout folder also holds `news.en-00000-of-00100`,
the union of all 50 heldout shards, which a glob would count twice.

Each line is one tokenized sentence, embedded as `<S> w1 … wn </S>`; sentences are
concatenated without padding into one int32 stream per split (training sentences shuffled once with
`seed`). `<S>` is never a scored target, so a sentence contributes n + 1 scored tokens and the test
perplexity is per word including `</S>` (App. C.1; 159,658 tokens on heldout-00000).

Vocabulary (docs/data.md): `vocab-2016-09-10.txt` or `1b_word_vocab.txt` if given or found in the
root, else rebuilt from the training shards (count >= 3, plus `<S>`, `</S>`, `<UNK>`); out-of-
vocabulary words map to `<UNK>`. Encoded streams are cached as .npy files and read back memory-mapped.
The held-out shards are encoded when the corpus opens (a file that is not UTF-8 is named with its
line and byte offset before a run trains), the training shards at the first training batch.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import warnings
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moe_impl.data.stream import StreamCorpus, count_scored
from moe_impl.data.text import read_lines

ARCHIVE_DIR = "1-billion-word-language-modeling-benchmark-r13output"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
NUM_TRAIN_SHARDS = 99  # shards 00001 .. 00099; 00000 became the heldout set
TEST_FILE = "news.en.heldout-00000-of-00050"
VALID_FILE = "news.en.heldout-00001-of-00050"
VOCAB_FILES = ("vocab-2016-09-10.txt", "1b_word_vocab.txt")  # searched in this order
BOS, EOS, UNK = "<S>", "</S>", "<UNK>"
MIN_COUNT = 3  # rebuilt vocabulary: words seen at least 3 times in training (Chelba et al. 2013)
PAPER_VOCAB_SIZE = 793_471
_MAX_TERM_ID = "!!!MAXTERMID"  # the last line of vocab-2016-09-10.txt, not a token
_CACHE_VERSION = "lm1b-stream-v1"
_GATHER_CHUNK = 1 << 20  # sentences per chunk when writing the shuffled stream


def train_shard_name(number: int) -> str:
    """File name of training shard `number` (1 .. 99)."""
    return f"news.en-{number:05d}-of-00100"


def sentence_words(line: str) -> list[str]:
    """The tokens of one LM1B line: the text is Moses-tokenized and split on single spaces
    (docs/data.md), so only the space separates tokens; empty strings (double spaces) are dropped."""
    return [word for word in line.rstrip("\r\n").split(" ") if word]


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 text file, split on '\\n' only; a decoding error names the file, the line
    and the byte offset (text.read_lines)."""
    return read_lines(path, newline="\n")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} not found: expected the file {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    return path


def _archive_folder(root: Path) -> Path:
    """`root` itself or its `1-billion-word-language-modeling-benchmark-r13output/` child."""
    if not root.is_dir():
        raise ValueError(f"LM1B root folder {root} does not exist")
    nested = root / ARCHIVE_DIR
    folder = nested if nested.is_dir() else root
    if not (folder / TRAIN_DIR).is_dir():
        raise ValueError(
            f"no LM1B training folder: expected {root / ARCHIVE_DIR / TRAIN_DIR} or "
            f"{root / TRAIN_DIR} (docs/data.md)"
        )
    return folder


def _train_shards(folder: Path, max_train_shards: int | None) -> list[Path]:
    train_dir = folder / TRAIN_DIR
    found = [
        train_dir / train_shard_name(n)
        for n in range(1, NUM_TRAIN_SHARDS + 1)
        if (train_dir / train_shard_name(n)).is_file()
    ]
    if not found:
        raise ValueError(
            f"no LM1B training shard in {train_dir}: expected files {train_shard_name(1)} .. "
            f"{train_shard_name(NUM_TRAIN_SHARDS)} (docs/data.md)"
        )
    wanted = NUM_TRAIN_SHARDS if max_train_shards is None else max_train_shards
    if len(found) < wanted:
        warnings.warn(
            f"found {len(found)} of the {NUM_TRAIN_SHARDS} LM1B training shards in {train_dir}; "
            "results are not comparable with the paper's",
            stacklevel=3,
        )
    files = found[:wanted]
    for path in files:
        _require_file(path, "LM1B training shard")
    return files


def read_vocab_file(path: Path) -> tuple[list[str], bool]:
    """Tokens of a vocabulary file, in id order, and whether they are sorted by frequency.

    Two formats (docs/data.md): one token per line (`vocab-2016-09-10.txt`, whose trailing
    `!!!MAXTERMID` line is skipped; it carries no counts and is taken to be frequency-ordered, as the
    standard file is) or `word count` per line (`1b_word_vocab.txt`; the counts are checked).
    `</S>` is inserted after `<S>` when missing (`1b_word_vocab.txt` uses `<S>` at both ends)."""
    lines = [line.rstrip("\r\n") for line in _read_lines(path)]
    lines = [line for line in lines if line.strip() and line != _MAX_TERM_ID]
    if not lines:
        raise ValueError(f"vocabulary file {path} is empty")
    first = lines[0].split()
    by_frequency = True
    if len(first) == 2 and first[1].isdigit():  # `word count` lines
        tokens, counts = [], []
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}, line {number}: expected 'word count', got {line!r}")
            tokens.append(parts[0])
            counts.append(int(parts[1]))
        ranked = [c for t, c in zip(tokens, counts, strict=True) if t not in (BOS, EOS, UNK)]
        by_frequency = all(a >= b for a, b in itertools.pairwise(ranked))
    else:
        tokens = lines
    if EOS not in tokens and BOS in tokens:
        tokens.insert(tokens.index(BOS) + 1, EOS)
    missing = [t for t in (BOS, EOS, UNK) if t not in tokens]
    if missing:
        warnings.warn(f"vocabulary file {path} lacks {missing}; appended at the end", stacklevel=3)
        tokens.extend(missing)
    return tokens, by_frequency


def build_vocab(files: Sequence[Path], min_count: int = MIN_COUNT) -> list[str]:
    """The rebuilt vocabulary (docs/data.md): training words seen at least `min_count` times plus
    `<S>`, `</S>` (counted once per sentence) and `<UNK>` (the words cut off), all sorted by count
    descending, then by the word, so that ids are frequency ranks."""
    counts: Counter[str] = Counter()
    sentences = 0
    for path in files:
        for line in _read_lines(path):
            words = sentence_words(line)
            if words:
                counts.update(words)
                sentences += 1
    kept = {w: c for w, c in counts.items() if c >= min_count and w not in (BOS, EOS, UNK)}
    unk = sum(counts.values()) - sum(kept.values())  # every occurrence that will map to <UNK>
    kept[BOS] = kept[EOS] = sentences
    kept[UNK] = unk
    return sorted(kept, key=lambda w: (-kept[w], w))


def _encode_files(
    files: Sequence[Path], index: dict[str, int], bos: int, eos: int, unk: int
) -> tuple[np.ndarray, np.ndarray]:
    """All sentences of `files` as `<S> ids </S>`, concatenated: (flat int32 ids, lengths)."""
    ids, lengths = array("i"), array("q")
    get = index.get
    for path in files:
        before = len(lengths)
        for line in _read_lines(path):
            words = sentence_words(line)
            if words:
                ids.append(bos)
                ids.extend([get(w, unk) for w in words])
                ids.append(eos)
                lengths.append(len(words) + 2)
        if len(lengths) == before:
            raise ValueError(f"{path} holds no sentence (only blank lines)")
    return np.frombuffer(ids, dtype=np.intc), np.frombuffer(lengths, dtype=np.int64)


def _assemble(
    flat: np.ndarray, lengths: np.ndarray, order: np.ndarray | None, out: np.ndarray
) -> None:
    """Write the sentences of `flat` into `out` in `order` (file order when None)."""
    if order is None:
        out[:] = flat
        return
    starts = np.cumsum(lengths) - lengths
    pos = 0
    for i in range(0, order.size, _GATHER_CHUNK):
        chosen = order[i : i + _GATHER_CHUNK]
        size = lengths[chosen]
        total = int(size.sum())
        # token j of the chunk comes from starts[sentence] + (j - first position of the sentence)
        index = np.repeat(starts[chosen] - (np.cumsum(size) - size), size) + np.arange(total)
        out[pos : pos + total] = flat[index]
        pos += total


def _writer_id() -> str:
    """Host and process: unique among the processes of a multi-node run on a shared filesystem."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _usable_cache_dir(path: Path) -> Path | None:
    """`path`, created if needed, or None (no caching) when it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{_writer_id()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        warnings.warn(f"cache folder {path} is not writable ({err}); not caching", stacklevel=3)
        return None
    return path


def _files_key(files: Sequence[Path]) -> list[str]:
    stats = [(path, path.stat()) for path in files]
    return [f"{path.name}:{st.st_size}:{st.st_mtime_ns}" for path, st in stats]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:24]


class LM1BCorpus(StreamCorpus):
    """The `Corpus` of LM1B (moe_impl/data/base.py): training windows by step over the shuffled
    training stream, evaluation passes over heldout-00000 (test) and heldout-00001 (valid)."""

    name = "lm1b"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        vocab_file: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        max_train_shards: int | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if max_train_shards is not None and (
            isinstance(max_train_shards, bool)
            or not isinstance(max_train_shards, int)
            or not 1 <= max_train_shards <= NUM_TRAIN_SHARDS
        ):
            raise ValueError(
                f"max_train_shards must be None or in [1, {NUM_TRAIN_SHARDS}], "
                f"got {max_train_shards!r}"
            )
        self.root = Path(root).expanduser()
        self.seed = seed
        self.folder = _archive_folder(self.root)
        self.train_files = _train_shards(self.folder, max_train_shards)
        heldout = self.folder / HELDOUT_DIR
        self.test_file = _require_file(heldout / TEST_FILE, "LM1B test shard")
        valid = heldout / VALID_FILE
        self.valid_file = _require_file(valid, "LM1B valid shard") if valid.exists() else None
        self.cache_dir = _usable_cache_dir(
            Path(cache_dir).expanduser() if cache_dir is not None else self.root / ".moe_cache"
        )
        self.vocab, self.ids_by_frequency, self.vocab_source = self._load_vocab(vocab_file)
        self.token_to_id: dict[str, int] = {}
        for i, token in enumerate(self.vocab):
            self.token_to_id.setdefault(token, i)
        self.vocab_size = len(self.vocab)
        self.bos_id, self.eos_id, self.unk_id = (self.token_to_id[t] for t in (BOS, EOS, UNK))
        self._vocab_digest = _digest(*self.vocab)
        self._streams: dict[str, np.ndarray] = {}
        # the held-out shards encoded (and cached) now: one that does not decode stops a run before
        # it trains, not at the final evaluation; the training shards are read at the first step
        for split in ("valid", "test"):
            if split == "test" or self.valid_file is not None:
                self.stream(split)

    # --- vocabulary ---------------------------------------------------------------------------

    def _load_vocab(self, vocab_file: str | os.PathLike | None) -> tuple[list[str], bool, str]:
        if vocab_file is not None:
            path = _require_file(Path(vocab_file).expanduser(), "LM1B vocabulary file")
            return (*read_vocab_file(path), str(path))
        for folder in dict.fromkeys((self.root, self.folder)):
            for name in VOCAB_FILES:
                if (folder / name).is_file():
                    path = _require_file(folder / name, "LM1B vocabulary file")
                    return (*read_vocab_file(path), str(path))
        source = f"rebuilt from {len(self.train_files)} training shards (count >= {MIN_COUNT})"
        cached = None
        if self.cache_dir is not None:
            key = _digest("lm1b-vocab-v1", str(MIN_COUNT), *_files_key(self.train_files))
            cached = self.cache_dir / f"lm1b-vocab-{key}.txt"
            if cached.is_file():
                return [line.rstrip("\n") for line in _read_lines(cached)], True, source
        tokens = build_vocab(self.train_files)
        if len(self.train_files) == NUM_TRAIN_SHARDS and len(tokens) != PAPER_VOCAB_SIZE:
            warnings.warn(
                f"the rebuilt LM1B vocabulary has {len(tokens):,} types, not the "
                f"{PAPER_VOCAB_SIZE:,} of the paper (docs/data.md); prefer vocab-2016-09-10.txt",
                stacklevel=3,
            )
        if cached is not None:
            tmp = cached.with_name(f"{cached.name}.{_writer_id()}.tmp")
            with tmp.open("w", encoding="utf-8", newline="\n") as f:
                f.writelines(f"{token}\n" for token in tokens)
            os.replace(tmp, cached)
        return tokens, True, source

    # --- streams ------------------------------------------------------------------------------

    def _split_files(self, split: str) -> tuple[list[Path], bool]:
        if split == "train":
            return self.train_files, True
        if split == "test":
            return [self.test_file], False
        if split == "valid":
            if self.valid_file is None:
                raise ValueError(
                    "no LM1B valid shard: expected the file "
                    f"{self.folder / HELDOUT_DIR / VALID_FILE} (docs/data.md)"
                )
            return [self.valid_file], False
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")

    def stream(self, split: str) -> np.ndarray:
        """The int32 token stream of `split` (read-only memmap when cached)."""
        if split not in self._streams:
            self._streams[split] = self._load_stream(split)
        return self._streams[split]

    def _load_stream(self, split: str) -> np.ndarray:
        files, shuffle = self._split_files(split)
        # The seed only shapes the shuffled training stream, so valid/test caches are shared.
        seed = str(self.seed) if shuffle else "-"
        key = _digest(_CACHE_VERSION, split, seed, self._vocab_digest, *_files_key(files))
        path = None if self.cache_dir is None else self.cache_dir / f"lm1b-{split}-{key}.npy"
        if path is not None and path.is_file():
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError):
                pass  # a damaged cache file: rebuild it
        flat, lengths = _encode_files(
            files, self.token_to_id, self.bos_id, self.eos_id, self.unk_id
        )
        order = np.random.default_rng(self.seed).permutation(lengths.size) if shuffle else None
        if path is not None:
            tmp = path.with_name(f"{path.name}.{_writer_id()}.tmp")
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=flat.shape)
                _assemble(flat, lengths, order, out)
                out.flush()
                del out
                os.replace(tmp, path)
                return np.load(path, mmap_mode="r")
            except OSError as err:
                tmp.unlink(missing_ok=True)
                warnings.warn(f"could not write the cache file {path} ({err})", stacklevel=3)
        ids = np.empty(flat.shape, dtype=np.int32)
        _assemble(flat, lengths, order, ids)
        return ids

    # --- the Corpus protocol ------------------------------------------------------------------

    @property
    def never_score(self) -> tuple[int, ...]:  # type: ignore[override]  # StreamCorpus: read only
        return (self.bos_id,)  # <S> is never predicted (docs/data.md)

    def describe(self) -> dict:
        test = self.stream("test")
        scored = count_scored(test, (self.bos_id,))
        return {
            "corpus": self.name,
            "root": str(self.folder),
            "train_shards": len(self.train_files),
            "train_tokens": int(self.stream("train").size),
            "test_file": self.test_file.name,
            "test_scored_tokens": scored,
            "test_unk_rate": float(np.count_nonzero(test[1:] == self.unk_id)) / max(scored, 1),
            "valid_file": None if self.valid_file is None else self.valid_file.name,
            "vocab_size": self.vocab_size,
            "vocab_source": self.vocab_source,
            "ids_by_frequency": self.ids_by_frequency,
            "seed": self.seed,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "perplexity": "per word including </S>; <S> not scored (docs/data.md)",
        }
