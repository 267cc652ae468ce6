"""Issue 28: TopicMarkov's vectorised training batches and sequences are the reference generator's
(moe_impl/data/synthetic_reference.py, the code every earlier run trained on) bit for bit, and its
successor tables are cached on disk (moe_impl/data/table_cache.py)."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from moe_impl.cli import main
from moe_impl.data import TopicMarkov, TopicMarkovConfig, synthetic_reference, table_cache

# (name, corpus, batch_size, seq_len): the configs the reproductions train on
SMOKE = TopicMarkovConfig(vocab_size=128, num_topics=8)  # config/train/smoke.yaml
LM1B = TopicMarkovConfig()  # config/train/cpu.yaml, the lm1b sweep's 256 x 64
NEWS = TopicMarkovConfig(num_clusters=8, shared_fanout=1)  # the news100b sweep's corpus, 64 x 64
GPU = TopicMarkovConfig(vocab_size=1023, num_topics=1024)  # config/train/gpu.yaml, 4096 x 64
# (name, corpus, batch_size, seq_len, steps of the unit tier; the slow tier: steps 0 .. 300)
TRAINED = [
    ("smoke", SMOKE, 8, 32, [*range(51), 1000, 10**6]),
    ("lm1b", LM1B, 256, 64, [*range(12), 1000, 10**6]),
    ("news100b", NEWS, 64, 64, [*range(25), 1000, 10**6]),
]

# adversarial: rows that the reference redraws with doubled counts (sequences capped short), the
# forced </S> at the cap (logp 0), long and short sequences, one-token rows, other draws
ADVERSARIAL = [
    ("max_len 1", TopicMarkovConfig(vocab_size=64, num_topics=4, max_len=1, eos_prob=0.01), 16, 64),
    ("max_len 3", TopicMarkovConfig(vocab_size=64, num_topics=4, max_len=3, eos_prob=0.01), 16, 64),
    ("max_len 20", TopicMarkovConfig(vocab_size=64, num_topics=4, max_len=20), 16, 64),
    ("eos 0.5", TopicMarkovConfig(vocab_size=64, num_topics=4, eos_prob=0.5), 16, 32),
    ("eos 0.01", TopicMarkovConfig(vocab_size=64, num_topics=4, eos_prob=0.01), 64, 64),
    ("eos 0.99", TopicMarkovConfig(vocab_size=64, num_topics=4, eos_prob=0.99), 16, 16),
    ("seq_len 1", TopicMarkovConfig(vocab_size=64, num_topics=4), 16, 1),
    ("long rows", TopicMarkovConfig(vocab_size=64, num_topics=4, max_len=300), 8, 600),
    (
        "all slots shared",
        TopicMarkovConfig(vocab_size=64, num_topics=6, fanout=3, num_clusters=3, shared_fanout=3),
        16,
        32,
    ),
    (
        "uniform, K = V",
        TopicMarkovConfig(vocab_size=16, num_topics=4, fanout=16, row_beta=0.0, zipf_s=0.0),
        16,
        32,
    ),
    ("seed 7", TopicMarkovConfig(vocab_size=64, num_topics=4, seed=7, row_beta=2.5), 16, 32),
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    """No test writes into the user's cache folder."""
    monkeypatch.setenv(table_cache.CACHE_ENV, str(tmp_path / "cache"))


def assert_same_batch(expected, got, where: str) -> None:
    for name, x, y in zip(expected._fields, expected, got, strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape, f"{where}: {name}"
        assert y.flags.c_contiguous == x.flags.c_contiguous, f"{where}: {name}"
        assert np.array_equal(x, y), f"{where}: {name}"


def assert_batches_match(corpus, batch_size: int, seq_len: int, steps) -> None:
    for step in steps:
        expected = synthetic_reference.train_batch(corpus, step, batch_size, seq_len)
        got = corpus.train_batch(step, batch_size, seq_len)
        assert_same_batch(expected, got, f"{corpus.cfg} step {step}")


def redrawn_rows(cfg: TopicMarkovConfig, batch, seq_len: int) -> int:
    """Rows holding more headers than the reference's first draw gives a row (its `count`): the
    rows it redrew with doubled counts."""
    stride = seq_len + 1
    count = min(int(1.5 * stride / (2.0 + (1 - cfg.eos_prob) / cfg.eos_prob)) + 4, stride)
    headers = 1 + (~batch.scored).sum(1)  # position 0 and every unscored target
    return int((headers > count).sum())


@pytest.mark.parametrize(
    ("name", "cfg", "batch_size", "seq_len", "steps"), TRAINED, ids=[t[0] for t in TRAINED]
)
def test_train_batch_is_the_reference_for_the_trained_configs(
    name, cfg, batch_size, seq_len, steps
):
    assert_batches_match(TopicMarkov(cfg), batch_size, seq_len, steps)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "cfg", "batch_size", "seq_len", "steps"), TRAINED, ids=[t[0] for t in TRAINED]
)
def test_train_batch_is_the_reference_over_many_steps(name, cfg, batch_size, seq_len, steps):
    assert_batches_match(TopicMarkov(cfg), batch_size, seq_len, range(301))


@pytest.mark.parametrize(
    ("name", "cfg", "batch_size", "seq_len"), ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL]
)
def test_train_batch_is_the_reference_at_the_edges(name, cfg, batch_size, seq_len):
    assert_batches_match(TopicMarkov(cfg), batch_size, seq_len, [*range(8), 1000, 10**6])


def test_the_edges_reach_the_redraw_and_the_cap():
    """The adversarial configs do exercise the reference's redraw of short rows (doubled counts,
    up to the whole stride) and the forced </S> at max_len, whose oracle log-probability is 0."""
    cfg = ADVERSARIAL[1][1]  # max_len 3: a sequence takes <= 5 positions, 4 of them < 65
    corpus = TopicMarkov(cfg)
    batch = corpus.train_batch(0, 16, 64)
    assert redrawn_rows(cfg, batch, 64) == 16
    forced = batch.scored & (batch.targets == cfg.eos_id) & (batch.oracle_logp == 0.0)
    assert forced.any()
    words = batch.scored & (batch.targets < cfg.vocab_size)
    assert (batch.oracle_logp[words] < 0).all()
    cfg = ADVERSARIAL[4][1]  # eos 0.01: a few rows of 64 x 64 need more than their first draw
    batches = [TopicMarkov(cfg).train_batch(step, 64, 64) for step in range(8)]
    assert sum(redrawn_rows(cfg, b, 64) for b in batches) > 0


def test_gpu_shape_is_the_reference(monkeypatch):
    """The gpu/ corpus's shape, 4096 x 64 rows over 1024 topics x 1024 states, on a table drawn
    quickly (the walk does not depend on how the table was drawn; the real one: the slow test)."""

    def quick_table(self):
        rng = np.random.default_rng(0)
        shape = (self.cfg.num_topics, self.cfg.vocab_size + 1, self.cfg.fanout)
        return rng.integers(0, self.cfg.vocab_size, size=shape, dtype=np.int32)

    monkeypatch.setattr(TopicMarkov, "_successor_table", quick_table)
    monkeypatch.setattr(table_cache, "MIN_CACHED_DRAWS", math.inf)
    assert_batches_match(TopicMarkov(GPU), 4096, 64, [0, 10**6])


@pytest.mark.slow
def test_gpu_corpus_is_the_reference():
    """The real gpu/ table (~30 s to draw) over a few whole 262,144-token batches."""
    assert_batches_match(TopicMarkov(GPU), 4096, 64, [0, 1, 2, 4000, 10**6])


@pytest.mark.parametrize("cfg", [SMOKE, NEWS, ADVERSARIAL[1][1], ADVERSARIAL[5][1]])
def test_sequences_are_the_reference(cfg):
    corpus = TopicMarkov(cfg)
    for split in ("train", "valid", "test"):
        for index in (np.arange(2000), np.array([7, 3, 10**9]), np.arange(0)):
            topics, tokens, logps = corpus.sequences(split, index)
            want = synthetic_reference.sequences(corpus, split, index)
            assert topics.dtype == want[0].dtype and np.array_equal(topics, want[0])
            assert len(tokens) == len(want[1]) == len(logps) == index.size
            for got, expected in zip([*tokens, *logps], [*want[1], *want[2]], strict=True):
                assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_eval_batches_are_unchanged(monkeypatch):
    corpus = TopicMarkov(NEWS)
    got = list(corpus.eval_batches("test", 8, 64, max_tokens=5000))
    monkeypatch.setattr(corpus, "sequences", lambda *a: synthetic_reference.sequences(corpus, *a))
    want = list(corpus.eval_batches("test", 8, 64, max_tokens=5000))
    assert len(got) == len(want)
    for i, (expected, batch) in enumerate(zip(want, got, strict=True)):
        assert_same_batch(expected, batch, f"eval window {i}")


# --- the table cache ------------------------------------------------------------------------------

MID = TopicMarkovConfig(vocab_size=96, num_topics=12, fanout=3)  # cached once MIN_CACHED_DRAWS = 0


@pytest.fixture
def cache_everything(monkeypatch):
    monkeypatch.setattr(table_cache, "MIN_CACHED_DRAWS", 0)


def drawn(cfg: TopicMarkovConfig) -> np.ndarray:
    """The table of `cfg` drawn afresh, never read from the cache."""
    return TopicMarkov._successor_table(SimpleNamespace(cfg=cfg))


def cached_files(tmp_path) -> list:
    folder = tmp_path / "cache" / "synthetic"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_the_cached_table_is_the_drawn_one(tmp_path, cache_everything, monkeypatch):
    fresh = drawn(MID)
    built = TopicMarkov(MID).successors
    (path,) = cached_files(tmp_path)
    assert path == table_cache.table_path(MID)
    assert path.name.startswith("topicmarkov-V96-T12-K3-") and path.suffix == ".npz"
    monkeypatch.setattr(TopicMarkov, "_successor_table", lambda self: pytest.fail("redrawn"))
    loaded = TopicMarkov(MID).successors
    assert loaded.dtype == built.dtype == np.int32 and np.array_equal(loaded, built)
    assert np.array_equal(built, fresh)


def test_configs_that_walk_differently_share_one_table(tmp_path, cache_everything):
    """eos_prob, max_len and row_beta do not change which successors a row holds: one file."""
    TopicMarkov(MID)
    other = TopicMarkovConfig(
        vocab_size=96, num_topics=12, fanout=3, eos_prob=0.3, max_len=9, row_beta=2.0
    )
    assert table_cache.table_path(other) == table_cache.table_path(MID)
    assert np.array_equal(TopicMarkov(other).successors, drawn(other))
    assert len(cached_files(tmp_path)) == 1
    # with no shared slots the clusters draw nothing: the same table and file
    clusters = TopicMarkovConfig(vocab_size=96, num_topics=12, fanout=3, num_clusters=4)
    assert table_cache.table_path(clusters) == table_cache.table_path(MID)


@pytest.mark.parametrize(
    "change",
    [
        {"vocab_size": 97},
        {"num_topics": 13},
        {"fanout": 4},
        {"num_clusters": 4, "shared_fanout": 1},
        {"shared_fanout": 1},
        {"zipf_s": 1.5},
        {"seed": 1},
    ],
)
def test_every_field_that_draws_the_table_is_in_its_key(change):
    base = {"vocab_size": 96, "num_topics": 12, "fanout": 3}
    cfg = TopicMarkovConfig(**{**base, **change})
    assert table_cache.table_path(cfg) != table_cache.table_path(MID)


@pytest.mark.parametrize(
    "damage",
    ["flip a byte", "truncate", "empty", "not a zip", "another config's table"],
)
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, cache_everything, damage):
    TopicMarkov(MID)
    (path,) = cached_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "empty":
        data = b""
    elif damage == "not a zip":
        data = b"\x93NUMPY not really" + bytes(100)
    else:
        other = TopicMarkovConfig(vocab_size=96, num_topics=12, fanout=3, seed=5)
        TopicMarkov(other)
        data = table_cache.table_path(other).read_bytes()
    path.write_bytes(data)
    with pytest.warns(UserWarning, match="is unusable .*rebuilding it"):
        table = TopicMarkov(MID).successors
    assert np.array_equal(table, drawn(MID))
    with warnings.catch_warnings():  # rewritten: the next start reads it without a word
        warnings.simplefilter("error")
        assert np.array_equal(TopicMarkov(MID).successors, table)


def test_a_table_of_the_wrong_shape_is_not_trusted(tmp_path, cache_everything):
    path = table_cache.table_path(MID)
    path.parent.mkdir(parents=True)
    key = json.dumps(table_cache.table_key(MID), sort_keys=True)
    np.savez(path, table=np.zeros((12, 97, 2), dtype=np.int32), key=np.array(key))
    with pytest.warns(UserWarning, match=r"expected int32 \(12, 97, 3\)"):
        assert np.array_equal(TopicMarkov(MID).successors, drawn(MID))


def test_small_tables_are_not_cached(tmp_path):
    """The default CPU corpus draws its table in ~0.5 s: no file (the smoke and CPU runs leave
    nothing behind)."""
    assert table_cache.table_draws(LM1B) < table_cache.MIN_CACHED_DRAWS
    assert table_cache.table_draws(GPU) > table_cache.MIN_CACHED_DRAWS
    TopicMarkov(SMOKE)
    TopicMarkov(NEWS)
    assert cached_files(tmp_path) == []


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path, cache_everything):
    table = drawn(MID)
    path = table_cache.table_path(MID)
    for _ in range(3):  # writers that race write the same bytes; the last rename wins
        table_cache._write(path, table, MID)
    assert cached_files(tmp_path) == [path]
    assert np.array_equal(table_cache._read(path, MID), table)


def test_an_unwritable_cache_is_a_warning(tmp_path, cache_everything, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(table_cache.CACHE_ENV, str(blocker))  # its synthetic/ cannot be made
    with pytest.warns(UserWarning, match="could not cache the successor table"):
        table = TopicMarkov(MID).successors
    assert np.array_equal(table, drawn(MID))


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(table_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert table_cache.cache_dir() == tmp_path / "mine" / "synthetic"
    monkeypatch.delenv(table_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert table_cache.cache_dir() == tmp_path / "xdg" / "moe_impl" / "synthetic"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert table_cache.cache_dir() == tmp_path / "home" / ".cache" / "moe_impl" / "synthetic"


# --- python -m moe_impl bench --data --------------------------------------------------------------


def test_bench_data_writes_identical_true(tmp_path, capsys):
    config = tmp_path / "toy.yaml"
    config.write_text(
        "data: {synthetic: {vocab_size: 64, num_topics: 4}}\ntrain: {batch_size: 8, seq_len: 16}\n"
    )
    argv = [
        "bench",
        "--data",
        "--config",
        str(config),
        "--set",
        "train.batch_size=4",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "data_bench.json").read_text())
    assert record["identical"] is True
    assert (record["batch_size"], record["seq_len"], record["steps"]) == (4, 16, 3)
    assert record["tokens_per_batch"] == 64
    for path in ("reference", "trainer"):
        row = record["paths"][path]
        assert row["tokens_per_s"] == pytest.approx(64 / row["ms_per_batch"] * 1e3)
    assert record["speedup"] == pytest.approx(
        record["paths"]["trainer"]["tokens_per_s"] / record["paths"]["reference"]["tokens_per_s"]
    )
    out = capsys.readouterr().out
    assert "reference" in out and "trainer" in out and "identical: true" in out


def test_bench_data_reports_a_difference(tmp_path, monkeypatch, capsys):
    from moe_impl.cli import bench

    def wrong(corpus, batch_size, seq_len, steps, workers=0):
        for step in steps:
            yield corpus.train_batch(step + 1, batch_size, seq_len)

    monkeypatch.setattr(bench, "trainer_batches", wrong)
    argv = [
        "bench",
        "--data",
        "--set",
        "data.synthetic.vocab_size=64",
        "--set",
        "data.synthetic.num_topics=4",
        "--set",
        "train.batch_size=2",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 1
    assert json.loads((tmp_path / "data_bench.json").read_text())["identical"] is False
    assert "differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "3"], "--config, --set and --steps apply only with --data"),
        (["--data", "--set", "data.corpus=text", "--set", "data.path=x"], "data.corpus='text'"),
    ],
)
def test_bench_data_errors_are_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
