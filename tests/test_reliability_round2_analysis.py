"""Analysis reliability, round two (issue 32): what `python -m analysis` does with run files and
outputs a careless user or a broken run leaves behind.

- Two configs' runs in one results/runs: `collect --runs RUN_DIR ...` reads exactly the run
  directories named (the workflow names those its config plans), never a sibling run of another
  config (the workflow itself, two configs in one directory: test_reliability_round2_workflow.py).
- Malformed run files stop the analysis with one line naming the file and what is wrong (exit 2),
  never an AttributeError from deep inside collect and never a NaN row that reaches a verdict: a
  summary.json that is a list, `{}` or a non-numeric test perplexity; a config.yaml that does not
  parse; an expert_load.json that is a list; a summary CSV row without a perplexity. A diverged run
  (summary.json's `diverged`) is the one run left out, with a line saying so.
- Unwritable outputs (`collect --out`, `figures --out` where a file sits in place of a folder, or
  a read-only file system) are one line, exit 2, not an OSError traceback.
"""

from __future__ import annotations

import json
import math

import pytest
from analysis_runs import good_runs, write_run

from analysis import cli, collect, io
from moe_impl.runs import rundir


@pytest.fixture
def runs(tmp_path):
    """Four finished run directories of the lm1b sweep under tmp_path/runs."""
    root = tmp_path / "runs"
    lm1b = [run for run in good_runs() if run["config"]["sweep"] == "lm1b"]
    return [write_run(root, run) for run in lm1b[:4]]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- finding 1: collect reads exactly the runs it is given ----------------------------------------


def test_collect_reads_only_the_named_run_directories(tmp_path, runs, capsys):
    out = tmp_path / "summary.csv"
    assert cli.main(["collect", "--runs", *map(str, runs[:2]), "--out", str(out)]) == 0
    summary = io.read_csv(out)
    assert sorted(summary["run_dir"]) == sorted(map(str, runs[:2]))
    # the whole folder still works as before (the default, results/runs)
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(out)]) == 0
    assert len(io.read_csv(out)) == 4


def test_a_hidden_folder_above_the_root_hides_nothing(tmp_path):
    """Only hidden folders below a root are skipped (set-aside runs), not a hidden parent of it."""
    root = tmp_path / ".work" / "runs"
    write_run(root, good_runs()[0])
    finished, unfinished = io.find_run_dirs(root)
    assert len(finished) == 1 and unfinished == []


# --- finding 6: malformed run files -------------------------------------------------------------


def _corrupt(path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (rundir.SUMMARY_FILE, "[1, 2]", "summary.json: expected a JSON object, got a list"),
        (rundir.SUMMARY_FILE, "{}", "summary.json: no test_perplexity, expected a finite number"),
        (
            rundir.SUMMARY_FILE,
            '{"test_perplexity": "low"}',
            "summary.json: test_perplexity a string (low), expected a finite number",
        ),
        (rundir.SUMMARY_FILE, "{not json", "summary.json: not valid JSON"),
        (rundir.CONFIG_FILE, "model: [unclosed\n", "config.yaml: not valid YAML"),
        (rundir.CONFIG_FILE, "- a list\n", "config.yaml: expected a mapping, got a list"),
        (rundir.EXPERT_LOAD_FILE, "[1]", "expert_load.json: expected a JSON object, got a list"),
        (
            rundir.EXPERT_LOAD_FILE,
            '{"steps": 2, "tokens_per_expert": "many"}',
            "expert_load.json: tokens_per_expert should be a list of numbers",
        ),
        (rundir.RUN_FILE, '"x"', "run.json: expected a JSON object, got a string"),
    ],
)
def test_a_malformed_run_file_is_one_line_naming_it(tmp_path, runs, capsys, name, text, expected):
    _corrupt(runs[1] / name, text)
    rc = cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(tmp_path / "s.csv")])
    assert rc == 2
    line = error_line(capsys)
    assert str(runs[1]) in line and expected in line, line
    assert not (tmp_path / "s.csv").exists()  # nothing half-collected


def test_a_non_numeric_summary_value_is_refused(runs):
    summary = json.loads((runs[0] / rundir.SUMMARY_FILE).read_text())
    summary["ops_per_timestep"] = "a lot"
    (runs[0] / rundir.SUMMARY_FILE).write_text(json.dumps(summary))
    with pytest.raises(
        ValueError, match=r"ops_per_timestep is a string \(a lot\), expected a number"
    ):
        collect.collect_runs(runs[0])


def test_a_diverged_run_is_left_out_with_a_line(tmp_path, runs, capsys):
    summary = json.loads((runs[2] / rundir.SUMMARY_FILE).read_text())
    summary.update(test_perplexity=None, test_nll=None, diverged="the test NLL is inf")
    (runs[2] / rundir.SUMMARY_FILE).write_text(json.dumps(summary))
    out = tmp_path / "summary.csv"
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(out)]) == 0
    assert f"skipped (diverged (the test NLL is inf)): {runs[2]}" in capsys.readouterr().err
    summary = io.read_csv(out)
    assert len(summary) == 3 and str(runs[2]) not in set(summary["run_dir"])
    assert summary["test_perplexity"].map(math.isfinite).all()


def test_figures_refuse_a_summary_row_without_a_perplexity(tmp_path, runs, capsys):
    out = tmp_path / "summary.csv"
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(out)]) == 0
    frame = io.read_csv(out)
    frame.loc[1, "test_perplexity"] = None
    frame.to_csv(out, index=False)
    capsys.readouterr()
    rc = cli.main(["figures", "--summary", str(out), "--out", str(tmp_path), "--no-mlflow"])
    assert rc == 2
    line = error_line(capsys)
    assert "no numeric test_perplexity for" in line and str(frame.loc[1, "run_id"]) in line


# --- finding 7: unwritable outputs --------------------------------------------------------------


def test_collect_to_an_unwritable_place_is_one_line(tmp_path, runs, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "summary.csv"
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(out)]) == 2
    assert f"error: cannot write {out}: " in error_line(capsys)


def test_figures_to_an_unwritable_place_is_one_line(tmp_path, runs, capsys):
    summary = tmp_path / "summary.csv"
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", str(summary)]) == 0
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["figures", "--summary", str(summary), "--out", str(blocker), "--no-mlflow"]
    rc = cli.main([*argv, "--only", "table6_balance"])
    assert rc == 2
    assert f"error: cannot write {blocker}/" in error_line(capsys)


def test_a_read_only_file_system_is_one_line(tmp_path, runs, capsys):
    """/proc refuses new files even to root (a chmod would not stop root)."""
    out = "/proc/moe-analysis/summary.csv"
    assert cli.main(["collect", "--runs", str(runs[0].parents[1]), "--out", out]) == 2
    assert "error: cannot write /proc/moe-analysis/summary.csv: " in error_line(capsys)
