"""Bad input is found before anything trains or allocates: a non-UTF-8
split of a corpus, a snapshot beyond the training budget, a benchmark configuration larger than
the free memory, an empty benchmark JSON, an MLflow store that does not exist. Each gives one line
naming the file, key or value; nothing is created or trained on the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY, make_archive, make_wikitext, set_args

from moe_impl.bench.spec import parse_experts
from moe_impl.cli import bench
from moe_impl.cli import main as moe_main
from moe_impl.data.lm1b import HELDOUT_DIR, TEST_FILE, VALID_FILE, LM1BCorpus
from moe_impl.data.text import TextCorpus
from moe_impl.train.config import load_config

# --- corpora: every split decoded when the corpus opens --------------------------------------------


def _spoil(path: Path, line: int = 2) -> int:
    """Insert a Latin-1 line (`café`, byte 0xe9) as line `line` of a UTF-8 file; the offset of
    the bad byte."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(line - 1, b" caf\xe9 au lait \n")
    path.write_bytes(b"".join(lines))
    return sum(len(x) for x in lines[: line - 1]) + len(b" caf")


def _one_line(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("split", ["test", "valid", "train"])
def test_text_corpus_finds_a_non_utf8_split_when_it_opens(tmp_path, split):
    folder = make_wikitext(tmp_path)
    path = folder / f"wiki.{split}.tokens"
    offset = _spoil(path, line=2)
    with pytest.raises(ValueError) as err:
        TextCorpus(folder)
    _one_line(str(err.value), str(path), "line 2", f"byte {offset}", "not UTF-8")


@pytest.mark.filterwarnings("ignore:found 3 of the 99 LM1B training shards")
@pytest.mark.parametrize("name", [TEST_FILE, VALID_FILE])
def test_lm1b_corpus_finds_a_non_utf8_heldout_shard_when_it_opens(tmp_path, name):
    top = make_archive(tmp_path / "lm1b")
    path = top / HELDOUT_DIR / name
    offset = _spoil(path, line=3)
    with pytest.raises(ValueError) as err:
        LM1BCorpus(top, cache_dir=tmp_path / "cache")
    _one_line(str(err.value), str(path), "line 3", f"byte {offset}")


def _text_run(folder: Path, *more: str) -> list[str]:
    sets = [
        *TINY,
        "data.corpus=text",
        f"data.path={folder}",
        "train.batch_size=2",
        "train.seq_len=4",
        "train.tokens=16",
        "eval.tokens=null",
        "eval.batch_size=1",
        "eval.seq_len=4",
        *more,
    ]
    return set_args(sets)


def test_training_stops_before_the_first_step_on_a_non_utf8_test_file(tmp_path, capsys):
    folder = make_wikitext(tmp_path)
    _spoil(folder / "wiki.test.tokens")
    out = tmp_path / "run"
    assert moe_main(["train", "--out", str(out), *_text_run(folder)]) == 2
    _one_line(capsys.readouterr().err.strip(), "error: ", "wiki.test.tokens", "line 2")
    assert not out.exists()  # refused before the run directory, let alone a training step


# --- snapshots beyond the budget --------------------------------------------------------------------


def test_a_snapshot_beyond_train_tokens_is_refused_at_config_time():
    with pytest.raises(ValueError) as err:
        load_config([], ["train.tokens=4096", "eval.at_tokens=[1024, 5000]"])
    _one_line(str(err.value), "eval.at_tokens", "5000", "train.tokens", "4096")
    cfg = load_config([], ["train.tokens=4096", "eval.at_tokens=[1024, 4096]"])  # the end is fine
    assert cfg.eval.at_tokens == (1024, 4096)


def test_a_snapshot_beyond_the_epochs_is_refused_when_the_corpus_opens(tmp_path, capsys):
    folder = make_wikitext(tmp_path)
    more = ("train.tokens=null", "train.epochs=1", "eval.at_tokens=[100000]")
    load_config([], [a for a in _text_run(folder, *more) if a != "--set"])  # unknown till then
    out = tmp_path / "run"
    assert moe_main(["train", "--out", str(out), *_text_run(folder, *more)]) == 2
    _one_line(capsys.readouterr().err.strip(), "eval.at_tokens", "100000", "train.epochs=1")
    assert not out.exists()
    assert moe_main(["train", "--check-data", *_text_run(folder, *more)]) == 2


# --- bench: memory estimated before a layer is built; all skipped is a failure ---------------------


def _bench_argv(*argv: str) -> list[str]:
    return ["bench", "--reps", "1", "--warmup", "0", *argv]


def test_bench_estimate_grows_with_the_gate_and_the_experts():
    from moe_impl.bench.memory import estimate_peak_bytes

    (flat,) = parse_experts("131072")
    (hier,) = parse_experts("131072-h")
    big = estimate_peak_bytes(flat, 64, 128, 4, 4096)
    assert big > 9 * 2**30  # the experts alone are 131072 x 2 x 64 x 128 floats = 8 GiB
    assert estimate_peak_bytes(hier, 64, 128, 4, 4096) < big  # no tokens x experts gate
    (small,) = parse_experts("4")
    assert estimate_peak_bytes(small, 64, 128, 4, 512) < 2**30


# (entry, tokens, measured peak MB): `bench` on our 2-core CPU machine, d=64, h=128, k=4, float32;
# ru_maxrss of the child, with the expert bank's workspace (2026-12-01, `--reps 1 --warmup 1`); the
# last row is from the code before it (2026-11-30), not re-measured (19 GB).
MEASURED_PEAKS = [
    ("4", 4096, 318),
    ("32", 4096, 335),
    ("256", 4096, 392),
    ("256-h", 4096, 386),
    ("1024-h", 4096, 511),
    ("4096-h", 4096, 1011),
    ("16384-h", 4096, 2354),
    ("1024", 4096, 681),
    ("16384", 4096, 5483),
    ("65536-h", 4096, 6515),
    ("131072-h", 4096, 10876),
    ("131072-h", 1024, 9189),
    ("16384", 1024, 2603),
    ("4096", 512, 841),
    ("4096-h", 512, 786),
    ("4", 64, 263),
    ("256", 16384, 663),
    ("32", 512, 285),
    ("1024-h", 16384, 821),
    ("4096-h", 65536, 2659),
    ("16384-h", 131072, 6771),
    ("65536-h", 131072, 19456),
]


@pytest.mark.parametrize(("entry", "tokens", "peak_mb"), MEASURED_PEAKS)
def test_bench_estimate_lies_at_or_just_above_the_measured_peak(entry, tokens, peak_mb):
    from moe_impl.bench.memory import estimate_peak_bytes

    (spec,) = parse_experts(entry)
    estimate_mb = estimate_peak_bytes(spec, 64, 128, 4, tokens) / 2**20
    assert peak_mb <= estimate_mb <= 1.4 * peak_mb


def test_bench_skips_a_configuration_larger_than_the_available_memory(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(bench, "available_bytes", lambda device: 2 * 2**30)
    monkeypatch.setattr(bench, "run_child", lambda cfg, max_rss_gb: started.append(cfg) or {})
    assert (
        moe_main(_bench_argv("--experts", "131072", "--tokens", "4096")) == bench.EXIT_NONE_MEASURED
    )
    assert started == []  # never built
    out = capsys.readouterr().out
    assert "estimated" in out and "2.0 GB available" in out


def test_bench_watchdog_uses_the_available_memory_not_the_total(monkeypatch):
    limits = []

    def child(cfg, max_rss_gb):
        limits.append(max_rss_gb)
        return {"status": "ok"}

    monkeypatch.setattr(bench, "available_bytes", lambda device: 5 * 2**30)
    monkeypatch.setattr(bench, "run_child", child)
    assert moe_main(_bench_argv("--experts", "4", "--tokens", "64")) == 0
    assert limits == [pytest.approx(5.0)]


def test_bench_exits_nonzero_when_every_configuration_was_skipped(monkeypatch, capsys):
    monkeypatch.setattr(
        bench, "run_child", lambda cfg, max_rss_gb: {"status": "skipped", "reason": "too slow"}
    )
    code = moe_main(_bench_argv("--experts", "4,8", "--tokens", "64"))
    assert code == bench.EXIT_NONE_MEASURED != 0
    assert "no configuration was measured" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        moe_main(["bench", "--help"])
    assert f"{bench.EXIT_NONE_MEASURED} " in capsys.readouterr().out


# --- analysis: a bad bench JSON, a missing MLflow store ---------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "{not json", '{"config": "4"}', "[]", "[1, 2]", '[{"config": "4", "kind": "flat"}]'],
)
def test_figures_names_an_empty_or_invalid_bench_file(tmp_path, capsys, text):
    from analysis import cli

    summary = tmp_path / "summary.csv"
    summary.write_text("run_id,sweep\nr1,lm1b\n")
    bad = tmp_path / "empty.json"
    bad.write_text(text)
    argv = ["figures", "--summary", str(summary), "--bench", str(bad), "--no-mlflow"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys.readouterr().err.strip(), "error: ", str(bad))


@pytest.mark.parametrize("how", ["uri", "default"])
def test_collect_from_a_missing_mlflow_store_creates_nothing(tmp_path, monkeypatch, capsys, how):
    from analysis import cli

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "results" / "mlflow.db"
    if how == "uri":
        db = tmp_path / "elsewhere" / "mlflow.db"
        argv = ["--uri", f"sqlite:///{db}"]
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        argv = []
    out = tmp_path / "summary.csv"
    assert cli.main(["collect", "--from-mlflow", "moe", *argv, "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err.strip(), "error: ", "no MLflow store", str(db))
    assert not db.parent.exists() and not out.exists()


def test_bench_json_written_by_bench_reads_back(tmp_path):
    """The check does not refuse what `bench --json` writes (rows with NaN measurements)."""
    from analysis import io

    path = tmp_path / "bench.json"
    row = {"config": "4", "kind": "flat", "num_experts": 4, "tokens_mode": "fixed_tokens"}
    path.write_text(json.dumps([{**row, "status": "skipped", "moe_ms_median": None}]))
    assert list(io.read_bench([path])["config"]) == ["4"]
