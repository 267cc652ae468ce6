"""Reliability of training, round two (issue 32): runs that survive what users do.

- A diverged run (finding 2): an evaluation whose NLL overflows exp() has perplexity inf, never an
  OverflowError; the run still writes summary.json, whose `diverged` gives the reason, and the
  CLI says so in one line with exit 3, again on every `--resume`. A snapshot that diverges ends
  the run there.
- A run directory without its config.yaml (finding 3): `--resume` writes it back from the newest
  intact checkpoint (which carries the resolved config), or refuses in one line when nothing holds
  it; a config other than the checkpoint's is refused by value, never a load_state_dict traceback.
- A test split shorter than `eval.tokens` (finding 12c): one warning line before training, and
  summary.json's `eval_scored_tokens` records what was scored.

Unit tier: tiny in-process runs (a shared finished run and a killed one, copied per test); the
integration tests run the real command in a subprocess."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, copy_run, losses, make_wikitext, set_args, tiny, whole_and_killed

from moe_impl.cli import main
from moe_impl.runs import rundir
from moe_impl.train import checkpoint, identity
from moe_impl.train.config import load_config
from moe_impl.train.loop import Trainer, TrainingDiverged
from moe_impl.train.summary import perplexity

ROOT = Path(__file__).resolve().parents[1]
SETS = set_args(TINY)  # the TINY run as command-line overrides
DIVERGES = "train.lr=100"  # the TINY run's test NLL then overflows exp() (~1e5 nats per token)


def one_error_line(err: str, *parts: str) -> None:
    """stderr is exactly one `error: ...` line (no traceback) holding every part."""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / rundir.SUMMARY_FILE).read_text())


# --- finding 2: a diverged run finishes, says so, and resumes to the same answer -----------------


def test_the_perplexity_of_an_overflowing_nll_is_inf():
    assert perplexity(1e7) == math.inf
    assert perplexity(math.inf) == math.inf
    assert math.isnan(perplexity(math.nan))
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)


def test_a_diverged_final_evaluation_writes_a_summary_that_says_so(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"^the run diverged: the final evaluation"):
        Trainer(tiny(DIVERGES), out).run()
    done = summary(out)
    assert done["steps"] == 12
    assert done["test_perplexity"] is None  # inf, written as null
    assert done["test_nll"] > 709  # finite, but exp() of it overflows
    assert done["diverged"].startswith("the final evaluation at step 12 has a test NLL of ")
    assert [r["perplexity"] for r in rundir.read_metrics(out) if r["kind"] == "eval"] == [None]


def test_a_finished_run_has_diverged_null(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(), out).run()
    assert summary(out)["diverged"] is None


def test_resuming_a_diverged_run_says_so_again_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *SETS, "--set", DIVERGES]) == 3
    first = capsys.readouterr().err
    one_error_line(first, "the run diverged", "train.lr", "summary.json")
    for _ in range(2):
        assert main(["train", "--out", str(out), "--resume"]) == 3
        assert capsys.readouterr().err == first


def test_a_diverged_snapshot_ends_the_run_there(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the snapshot evaluation at step 5 has"):
        Trainer(tiny(DIVERGES, "eval.at_tokens=[960]"), out).run()  # 960 tokens: step 5
    done = summary(out)
    assert done["steps"] == 5 and done["test_perplexity"] is None
    assert done["diverged"].startswith("the snapshot evaluation at step 5 has a test NLL of ")
    assert [s["step"] for s in done["snapshots"]] == [5]
    assert max(r["step"] for r in rundir.read_metrics(out)) == 5


@pytest.mark.integration
def test_the_command_of_a_diverged_run_exits_3_with_one_line(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "moe_impl", "train", "--out", str(out)]
    first = subprocess.run(
        [*command, *SETS, "--set", DIVERGES], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert first.returncode == 3, first.stderr
    one_error_line(first.stderr, "the run diverged")
    assert summary(out)["diverged"]
    again = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert (again.returncode, again.stderr) == (3, first.stderr)


# --- finding 3: a run directory that lost its config.yaml ---------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A finished TINY run ("whole") and the same run killed before step 8 ("killed")."""
    return whole_and_killed(tmp_path_factory.mktemp("runs"))


def copy(runs: dict, which: str, tmp_path: Path) -> Path:
    return copy_run(runs, which, tmp_path)


def same_run(config_file: Path, original: Path) -> bool:
    """Whether two config.yaml files define the same run (identity.differences)."""
    return not identity.differences(load_config([original]), load_config([config_file]))


def strip_config(run_dir: Path) -> None:
    """Rewrite every checkpoint as older versions wrote them: without the run's config."""
    for path in (run_dir / rundir.CHECKPOINT_DIR).glob("step-*.pt"):
        state = torch.load(path, weights_only=False)
        state.pop("config", None)
        torch.save(state, path)


def test_a_finished_run_gets_its_config_back_from_its_checkpoint(runs, tmp_path, capsys):
    out = copy(runs, "whole", tmp_path)
    (out / rundir.CONFIG_FILE).unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml" in err and "step-00000012.pt" in err, err
    assert same_run(out / rundir.CONFIG_FILE, runs["whole"] / rundir.CONFIG_FILE)
    assert summary(out) == summary(runs["whole"])


def test_an_unfinished_run_gets_its_config_back_and_finishes(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    (out / rundir.CONFIG_FILE).unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert same_run(out / rundir.CONFIG_FILE, runs["whole"] / rundir.CONFIG_FILE)
    assert summary(out)["steps"] == 12
    assert losses(out) == losses(runs["whole"])


def test_a_finished_run_without_config_or_checkpoint_is_refused(runs, tmp_path, capsys):
    out = copy(runs, "whole", tmp_path)
    (out / rundir.CONFIG_FILE).unlink()
    shutil.rmtree(out / rundir.CHECKPOINT_DIR)
    assert main(["train", "--out", str(out), "--resume"]) == 2
    one_error_line(capsys.readouterr().err, str(out / rundir.CONFIG_FILE), "--config")
    assert not (out / rundir.CONFIG_FILE).exists()  # never a default config


def test_a_config_other_than_the_checkpoints_is_refused_by_value(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    (out / rundir.CONFIG_FILE).unlink()
    other = ["--config", str(runs["whole"] / rundir.CONFIG_FILE), "--set", "model.d_hidden=32"]
    assert main(["train", "--out", str(out), *other, "--resume"]) == 2
    one_error_line(capsys.readouterr().err, "config differs", "model.d_hidden 16 -> 32")
    assert checkpoint.latest(out).name == "step-00000005.pt"  # nothing trained, nothing lost
    assert not (out / rundir.CONFIG_FILE).exists()  # `--resume` alone writes it back


def test_the_same_config_given_resumes_a_run_without_config_yaml(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    (out / rundir.CONFIG_FILE).unlink()
    same = ["--config", str(runs["whole"] / rundir.CONFIG_FILE)]
    assert main(["train", "--out", str(out), *same, "--resume"]) == 0, capsys.readouterr().err
    assert losses(out) == losses(runs["whole"])
    assert same_run(out / rundir.CONFIG_FILE, runs["whole"] / rundir.CONFIG_FILE)


def test_a_hand_edited_config_yaml_is_refused_by_the_checkpoint(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    path = out / rundir.CONFIG_FILE
    path.write_text(path.read_text().replace("d_hidden: 16", "d_hidden: 32"))
    assert main(["train", "--out", str(out), "--resume"]) == 2
    one_error_line(capsys.readouterr().err, "step-00000005.pt", "model.d_hidden 16 -> 32")


def test_an_old_checkpoint_without_its_config_still_resumes(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    strip_config(out)
    assert main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert losses(out) == losses(runs["whole"])


def test_an_old_checkpoint_cannot_restore_a_lost_config(runs, tmp_path, capsys):
    out = copy(runs, "killed", tmp_path)
    strip_config(out)
    (out / rundir.CONFIG_FILE).unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    one_error_line(capsys.readouterr().err, str(out / rundir.CONFIG_FILE), "step-00000005.pt")
    assert not (out / rundir.CONFIG_FILE).exists()


# --- finding 12c: a test split shorter than eval.tokens ------------------------------------------


def test_a_test_split_shorter_than_eval_tokens_warns(tmp_path, capsys):
    folder = make_wikitext(tmp_path)
    (folder / "wiki.test.tokens").write_text(" the cat \n")  # the, cat, <eos>: 3 scored tokens
    cfg = tiny(
        "data.corpus=text",
        f"data.path={folder}",
        "train.batch_size=2",
        "train.seq_len=4",
        "train.tokens=16",
        "eval.tokens=600",
        "eval.batch_size=1",
        "eval.seq_len=4",
    )
    out = tmp_path / "run"
    Trainer(cfg, out).run()
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1, err
    assert "3 scored tokens" in err and "eval.tokens=600" in err and "eval_scored_tokens" in err
    assert summary(out)["eval_scored_tokens"] == 3
