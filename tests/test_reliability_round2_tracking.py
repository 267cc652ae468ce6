"""Reliability of MLflow tracking, round two (issue 32, findings 8-10): what users do to the UI
command and to a tracked run.

- `tracking ui` on a store that does not exist refuses in one line (exit 2) and creates nothing,
  unless `--create` asks for an empty store; `tracking screenshot` refuses the same case.
- `tracking ui` and `tracking screenshot` on a port something listens on already refuse in one
  line (exit 2) before printing any address or starting a server; a UI server that stops by itself
  is an error (exit 1), not a clean exit.
- Resuming a tracked run does not warn that its config changed when only the params' text
  differs ("1.0" in MLflow, 1 in config.yaml); a real change still warns.

The CLI tests replace the MLflow server with a stand-in (no test here waits ~15 s for a real one).
Unit tier but for the tests marked integration (they open MLflow stores or train a tiny run).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import free_port, run_until_killed, tiny

from moe_impl import cli, tracking
from moe_impl.tracking import browser, store

CHANGED = "keep their first values"  # the warning of a changed param (store.new_params)


def one_line(err: str, *parts: str) -> None:
    """`err` is one `error: ...` line holding every one of `parts`."""
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, (part, err)


class CtrlC:
    """A stand-in for the server process: the user presses Ctrl-C as soon as it runs."""

    def wait(self, timeout=None):
        raise KeyboardInterrupt

    def poll(self):
        return 0


@pytest.fixture
def servers(monkeypatch) -> list[tuple]:
    """tracking.start_server replaced: records its (host, port, uri) and returns a CtrlC."""
    calls = []

    def fake(host, port, uri, **kwargs):
        calls.append((host, port, uri))
        return CtrlC()

    monkeypatch.setattr(tracking, "start_server", fake)
    return calls


@pytest.fixture
def listener():
    """A port on 127.0.0.1 that something listens on (the port number)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def made_store(tmp_path_factory) -> str:
    """An existing (created and migrated) store with one experiment."""
    uri = "sqlite:///" + (tmp_path_factory.mktemp("store") / "mlflow.db").as_posix()
    return tracking.init_store(uri, "round2")


# --- finding 8: `tracking ui` on a store that does not exist ------------------------------------


@pytest.mark.parametrize("how", ["uri", "default"])
def test_ui_on_a_missing_store_refuses_and_creates_nothing(
    tmp_path, monkeypatch, capsys, servers, how
):
    monkeypatch.chdir(tmp_path)
    if how == "uri":
        db = tmp_path / "nope" / "mlflow.db"
        argv = ["--uri", f"sqlite:///{db}"]
    else:  # results/mlflow.db of the working directory, as `make mlflow-ui`
        db = tmp_path / "results" / "mlflow.db"
        argv = []
    assert cli.main(["tracking", "ui", "--port", str(free_port()), *argv]) == 2
    out, err = capsys.readouterr()
    one_line(err, "no MLflow store", f"sqlite:///{db}", "tracking init", "--create")
    assert "http://" not in out and servers == []
    assert not db.parent.exists()


@pytest.mark.integration  # creates a store
def test_ui_create_serves_a_new_store(tmp_path, capsys, servers):
    db = tmp_path / "new" / "mlflow.db"
    port = free_port()
    argv = ["tracking", "ui", "--port", str(port), "--uri", f"sqlite:///{db}", "--create"]
    assert cli.main(argv) == 0  # served until Ctrl-C
    assert db.is_file() and servers == [("127.0.0.1", port, f"sqlite:///{db}")]
    assert f"MLflow UI for sqlite:///{db}: http://127.0.0.1:{port}" in capsys.readouterr().out


def test_screenshot_of_a_missing_store_refuses_and_creates_nothing(tmp_path, capsys, servers):
    db = tmp_path / "nope" / "mlflow.db"
    argv = ["tracking", "screenshot", "--out", str(tmp_path / "x.png"), "--uri", f"sqlite:///{db}"]
    assert cli.main([*argv, "--port", str(free_port())]) == 2
    one_line(capsys.readouterr().err, "no MLflow store", f"sqlite:///{db}", "--uri")
    assert not db.parent.exists() and servers == []


# --- finding 9: a port in use, a server that stops by itself -------------------------------------


@pytest.mark.integration  # opens a store
def test_ui_on_a_port_in_use_refuses_before_printing_an_address(
    made_store, listener, capsys, servers
):
    assert cli.main(["tracking", "ui", "--port", str(listener), "--uri", made_store]) == 2
    out, err = capsys.readouterr()
    one_line(err, f"port {listener}", "in use", "--port")
    assert "http://" not in out and servers == []


@pytest.mark.integration  # opens a store
def test_screenshot_on_a_port_in_use_refuses(made_store, listener, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(browser, "find_chromium", lambda: None)  # the port is checked first
    argv = ["tracking", "screenshot", "--out", str(tmp_path / "x.png"), "--uri", made_store]
    assert cli.main([*argv, "--port", str(listener)]) == 2
    one_line(capsys.readouterr().err, f"port {listener}", "in use", "--port")
    assert not (tmp_path / "x.png").exists()


def test_port_check_frees_the_port(listener):
    port = free_port()
    store.check_port_free("127.0.0.1", port)
    store.check_port_free("127.0.0.1", port)  # the check's own socket is closed
    with pytest.raises(ValueError, match=f"port {listener} on 127.0.0.1 is in use"):
        store.check_port_free("127.0.0.1", listener)
    with pytest.raises(ValueError, match="--host"):
        store.check_port_free("no-such-host.invalid", port)


@pytest.mark.integration  # opens a store
def test_ui_whose_server_stops_by_itself_fails(made_store, monkeypatch, capsys):
    """The server exits 0 on its own (as `mlflow server` does when it cannot bind): exit 1."""

    def exits(host, port, uri, **kwargs):
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(tracking, "start_server", exits)
    assert cli.main(["tracking", "ui", "--port", str(free_port()), "--uri", made_store]) == 1
    one_line(capsys.readouterr().err, "MLflow server", "stopped", "exit code 0")


def exited() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc


def test_waiting_for_a_server_that_stopped_ends_at_once():
    """Not two minutes of waiting, nor another server's answer at that address."""
    with pytest.raises(browser.ServerStopped, match="stopped by itself"):
        browser.wait_until_up(f"http://127.0.0.1:{free_port()}", timeout_s=60, proc=exited())


@pytest.mark.integration  # opens a store
def test_screenshot_whose_server_stops_by_itself_fails(made_store, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(browser, "find_chromium", lambda: "/bin/true")
    monkeypatch.setattr(tracking, "start_server", lambda *args, **kwargs: exited())
    out = tmp_path / "x.png"
    argv = ["tracking", "screenshot", "--out", str(out), "--uri", made_store]
    assert cli.main([*argv, "--port", str(free_port())]) == 1
    one_line(capsys.readouterr().err, "MLflow server", "stopped by itself")
    assert not out.exists()


# --- finding 10: no false "config changed" warning on resume -------------------------------------


def fake_run(params: dict[str, str]):
    return SimpleNamespace(data=SimpleNamespace(params=params))


@pytest.mark.parametrize(
    ("first", "now"),
    [
        ("1.0", "1"),
        ("1", "1.0"),
        ("0.0", "0"),
        ("1e-05", "1.0e-05"),
        ("None", "None"),
        ("None", "null"),
        ("[[16, null], [16, null]]", "[[16.0, null], [16, null]]"),
        ('{"a": 1.0}', '{"a": 1}'),
        ("True", "true"),
        ("lm1b", "lm1b"),
    ],
)
def test_the_same_value_written_differently_is_no_change(caplog, first, now):
    with caplog.at_level(logging.WARNING):
        assert store.new_params(fake_run({"k": first}), {"k": now, "new": "2"}) == {"new": "2"}
    assert CHANGED not in caplog.text


@pytest.mark.parametrize(
    ("first", "now"),
    [
        ("1.0", "0.5"),
        ("None", "1.0"),
        ("1.0", "None"),
        ("True", "1"),
        ("0", "False"),
        ("lm1b", "wikitext"),
        ("[16, 16]", "[16, 32]"),
        ("12345678901234567", "12345678901234568"),
    ],
)
def test_a_changed_value_still_warns(caplog, first, now):
    with caplog.at_level(logging.WARNING):
        assert store.new_params(fake_run({"k": first}), {"k": now}) == {}
    assert CHANGED in caplog.text and "['k']" in caplog.text


@pytest.mark.integration  # trains a tiny tracked run
def test_readme_form_resume_warns_of_no_config_change(tmp_path, caplog):
    from moe_impl.train.loop import Trainer

    out = tmp_path / "run"
    cfg = tiny("tracking.enabled=true", "experiment=round2-resume")
    run_until_killed(Trainer(cfg, out), at_step=8)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    assert CHANGED not in caplog.text


# --- finding 11: `tracking sync`, the workflow's step that brings a store up to date ------------


def sync_run_dirs(root, *, tracking: list[dict]) -> list:
    """Finished run directories under root, one per `tracking` section (analysis_runs.py's layout)."""
    from analysis_runs import good_runs, write_run

    dirs = []
    for run, section in zip(good_runs(), tracking, strict=False):
        run["config"]["tracking"] = section
        dirs.append(write_run(root, run))
    return dirs


def test_sync_groups_tracked_runs_by_store_and_leaves_out_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/mlflow.db")
    other = "sqlite:////elsewhere/mlflow.db"
    dirs = sync_run_dirs(
        tmp_path,
        tracking=[
            {"enabled": True, "uri": None},
            {"enabled": False, "uri": None},  # untracked: never pushed into a store
            {"enabled": True, "uri": other},
            {"enabled": True, "uri": None},
        ],
    )
    (dirs[3] / "summary.json").unlink()  # unfinished: nothing to import yet
    assert tracking.sync.tracked_stores(dirs) == {
        "sqlite:////env/mlflow.db": [dirs[0]],
        other: [dirs[2]],
    }


def test_sync_to_an_unreachable_store_warns_and_succeeds(tmp_path, capsys, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dirs = sync_run_dirs(tmp_path, tracking=[{"enabled": True, "uri": uri}])
    with caplog.at_level(logging.WARNING):
        assert cli.main(["tracking", "sync", *map(str, dirs)]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{uri}: not updated (")
    assert "runs are safe in their run directories" in caplog.text
