"""Damaged checkpoints, a full disk, a bad --out and two processes on one run directory: each ends in
one clear line (or a warning and a fallback), and nothing is lost or trained twice.

The TINY run (tests/helpers.py) has 12 steps and checkpoints at steps 5 and 10 (two are kept), so a
run killed before step 11 holds step-00000005.pt and step-00000010.pt, latest.txt naming the second.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import HIER_16, TINY, losses, run_until_killed, set_args, tiny

from moe_impl.cli import main
from moe_impl.runs import lock
from moe_impl.train import checkpoint, loop
from moe_impl.train.loop import Trainer

SETS = [arg for s in TINY for arg in ("--set", s)]
STEP5, STEP10 = "step-00000005.pt", "step-00000010.pt"


def one_line(err: str) -> str:
    """The only line of stderr (asserts there is one and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def damage(path: Path, kind: str) -> None:
    """Damage a checkpoint file the way disks and users do."""
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes((i * 151 + 7) % 256 for i in range(len(data))))
    elif kind == "bit-flip":  # one bit in the middle of the largest tensor's bytes
        with zipfile.ZipFile(path) as z:
            record = max(z.infolist(), key=lambda info: info.file_size)
            payload = z.read(record)
        at = data.find(payload) + len(payload) // 2
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    else:
        raise AssertionError(kind)


def killed_with_two_checkpoints(run_dir: Path, cfg) -> None:
    run_until_killed(Trainer(cfg, run_dir), at_step=11)
    assert checkpoint.latest(run_dir).name == STEP10
    assert (run_dir / "checkpoints" / STEP5).exists()


# --- a damaged latest checkpoint ----------------------------------------------------------------

DAMAGE = {  # kind -> a word the warning uses for it
    "truncated": "truncated",
    "zero-byte": "empty",
    "garbage": "not a",
    "bit-flip": "CRC",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path, capsys, kind):
    cfg = tiny()
    whole = Trainer(cfg, tmp_path / "whole").run()
    cut = tmp_path / "cut"
    killed_with_two_checkpoints(cut, cfg)
    damage(cut / "checkpoints" / STEP10, kind)
    capsys.readouterr()

    resumed = Trainer(cfg, cut, resume=True)
    warning = one_line(capsys.readouterr().err)
    assert warning.startswith("warning:") and STEP10 in warning and DAMAGE[kind] in warning
    assert STEP5 in warning  # what it resumed from instead
    assert resumed.step == 5
    summary = resumed.run()
    assert losses(cut) == losses(tmp_path / "whole")  # nothing lost, nothing logged twice
    assert summary["test_nll"] == whole["test_nll"]


def test_every_checkpoint_damaged_is_a_one_line_error(tmp_path, capsys):
    cut = tmp_path / "cut"
    killed_with_two_checkpoints(cut, tiny())
    damage(cut / "checkpoints" / STEP10, "truncated")
    damage(cut / "checkpoints" / STEP5, "zero-byte")
    metrics = (cut / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(["train", "--out", str(cut), "--resume", *SETS]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error:") and "no intact checkpoint" in line
    assert STEP10 in line and STEP5 in line and "--out" in line  # what to do
    assert (cut / "metrics.jsonl").read_text() == metrics  # nothing touched


def test_a_damaged_rank_file_is_named(tmp_path):
    """The per-rank layout: a truncated or bit-flipped rank file is a one-line error naming it."""
    for step in (5, 10):
        for rank in (1, 0):
            state = {"rank": rank, "w": torch.arange(4096.0) * step}
            checkpoint.save(tmp_path, step, state, rank=rank, world_size=2)
    newest = checkpoint.latest(tmp_path)
    assert newest.name == "step-00000010"
    for kind in ("truncated", "bit-flip"):
        shard = newest / "rank-00001-of-00002.pt"
        checkpoint.save(tmp_path, 10, {"rank": 1, "w": torch.arange(4096.0)}, rank=1, world_size=2)
        damage(shard, kind)
        assert checkpoint.load(newest, rank=0, world_size=2)["rank"] == 0  # its own file is fine
        with pytest.raises(ValueError, match=DAMAGE[kind]) as err:
            checkpoint.load(newest, rank=1, world_size=2)
        assert str(shard) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.integration
def test_a_two_rank_run_falls_back_from_a_damaged_rank_file(tmp_path, capsys):
    """Killed after its step-10 checkpoint, one rank's file of it truncated: resumed by two
    processes (rank 1 finds the damage, both fall back) and by one (resharding reads every file),
    both end with the losses of the uninterrupted run."""
    import shutil

    from parallel_workers import train_run

    from moe_impl.parallel import spawn
    from moe_impl.train.config import load_config

    overrides = [
        *TINY,
        *HIER_16,
        "model.sparse_grad=true",
        "distributed.replicate_noise=true",
    ]
    Trainer(load_config([], overrides), tmp_path / "whole").run()
    want = torch.tensor(losses(tmp_path / "whole"))
    two = tmp_path / "two"
    spawn(train_run, 2, (overrides, str(two), False, 11), timeout_s=240)
    assert checkpoint.latest(two).name == "step-00000010"
    damage(two / "checkpoints" / "step-00000010" / "rank-00001-of-00002.pt", "truncated")
    shutil.copytree(two, tmp_path / "one")

    spawn(train_run, 2, (overrides, str(two), True), timeout_s=240)
    trainer = Trainer(load_config([], overrides), tmp_path / "one", resume=True)
    assert trainer.step == 5
    warning = capsys.readouterr().err
    assert "rank-00001-of-00002.pt" in warning and "truncated" in warning
    trainer.run()
    for run in (two, tmp_path / "one"):
        torch.testing.assert_close(torch.tensor(losses(run)), want, rtol=1e-5, atol=1e-6)


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_and_loses_nothing(
    tmp_path, capsys, monkeypatch
):
    """The writer fails with ENOSPC half-way through step 10's checkpoint: one line naming ENOSPC
    and the file, no .tmp left, step 5 intact and named, and --resume (space freed) finishes with
    the losses of an uninterrupted run."""
    whole = Trainer(tiny(), tmp_path / "whole").run()
    out = tmp_path / "full"
    real_save = torch.save

    def disk_fills_at_step_10(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and obj.get("step") == 10):
            return real_save(obj, f, *args, **kwargs)
        part = b"PK\x03\x04" + b"\0" * 2000
        if isinstance(f, str | os.PathLike):
            Path(f).write_bytes(part)
        else:
            f.write(part)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_fills_at_step_10)
        assert main(["train", "--out", str(out), *SETS]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error:") and "ENOSPC" in line and STEP10 in line
    folder = out / "checkpoints"
    assert not [p.name for p in folder.rglob("*.tmp")]
    assert checkpoint.latest(out).name == STEP5
    assert checkpoint.load(checkpoint.latest(out))["step"] == 5

    summary = Trainer(tiny(), out, resume=True).run()
    assert losses(out) == losses(tmp_path / "whole")
    assert summary["test_nll"] == whole["test_nll"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_enospc_from_the_kernel(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full file system does: the temporary file of
    step 10 is a link to it."""
    checkpoint.save(tmp_path, 5, {"w": torch.zeros(8)})
    folder = tmp_path / "checkpoints"
    (folder / (STEP10 + ".tmp")).symlink_to("/dev/full")
    with pytest.raises(ValueError, match="ENOSPC") as err:
        checkpoint.save(tmp_path, 10, {"w": torch.ones(100_000)})
    assert STEP10 in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.txt", STEP5]
    assert checkpoint.latest(tmp_path).name == STEP5
    assert checkpoint.load(checkpoint.latest(tmp_path))["w"].sum() == 0


def _can_mount_a_private_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _can_mount_a_private_tmpfs(), reason="needs unshare -rm (user namespaces)")
def test_a_real_full_tmpfs(tmp_path):
    """The CLI on a tmpfs with room for one checkpoint but not two (in a private mount namespace,
    no root needed; it vanishes with it): the same line, and after the file system grows, --resume
    finishes with the losses of an uninterrupted run."""
    Trainer(tiny(), tmp_path / "whole").run()
    size = (tmp_path / "whole" / "checkpoints" / "step-00000012.pt").stat().st_size
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    train = " ".join(
        shlex.quote(a) for a in [sys.executable, "-m", "moe_impl", "train", "--out", f"{disk}/run"]
    )
    sets = " ".join(shlex.quote(a) for a in SETS)
    script = f"""
        mount -t tmpfs -o size={size * 3 // 2} tmpfs {disk}
        {train} {sets} > /dev/null 2> {logs}/first.err && echo 0 > {logs}/first.rc || echo $? > {logs}/first.rc
        ls -A {disk}/run/checkpoints > {logs}/left.txt
        mount -o remount,size={size * 8} {disk}
        {train} --resume {sets} > /dev/null 2> {logs}/resumed.err && echo 0 > {logs}/resumed.rc || echo $? > {logs}/resumed.rc
        cp {disk}/run/metrics.jsonl {logs}/metrics.jsonl
    """
    subprocess.run(["unshare", "-rm", "sh", "-ec", script], timeout=300, check=True)
    assert (logs / "first.rc").read_text().strip() == "2"
    line = one_line((logs / "first.err").read_text())
    assert "ENOSPC" in line and STEP10 in line and f"{STEP5}, is intact" in line
    assert (logs / "left.txt").read_text().split() == ["latest.txt", STEP5]
    assert (logs / "resumed.rc").read_text().strip() == "0", (logs / "resumed.err").read_text()
    assert losses(logs) == losses(tmp_path / "whole")


# --- --out --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_out_pointing_at_a_file_is_refused_before_anything_is_built(
    tmp_path, capsys, monkeypatch, where
):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    out = notes if where == "is-a-file" else notes / "run"

    def builds(*args, **kwargs):
        raise AssertionError("the trainer was built")

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "__init__", builds)
        assert main(["train", "--out", str(out), *SETS]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error:") and "--out" in line and str(notes) in line and "file" in line
    with pytest.raises(ValueError, match="file"):  # the Trainer itself says so too
        Trainer(tiny(), out)
    assert notes.read_text() == "keep me\n"


# --- two processes, one run directory -----------------------------------------------------------


@pytest.mark.integration
def test_a_second_process_on_the_same_out_is_refused(tmp_path, capsys):
    """A real training process holds the run directory: a second one (new or --resume) is refused
    with its pid and host and writes nothing; once the first is killed (-9), the lock it left does
    not block a resume."""
    out = tmp_path / "run"
    endless = [*TINY, "train.tokens=1000000000"]
    cmd = [sys.executable, "-m", "moe_impl", "train", "--out", str(out)]
    first = subprocess.Popen(
        [*cmd, *set_args(endless)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while checkpoint.latest(out) is None:  # training, and has checkpointed
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run did not checkpoint"
            time.sleep(0.1)
        config = (out / "config.yaml").read_text()

        assert main(["train", "--out", str(out), *SETS]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"pid {first.pid}" in line and socket.gethostname() in line
        with pytest.raises(ValueError, match=f"pid {first.pid}"):
            Trainer(tiny("train.tokens=1000000000"), out, resume=True)
        assert (out / "config.yaml").read_text() == config
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
        first.wait()

    trainer = Trainer(tiny("train.tokens=1000000000"), out, resume=True)  # not blocked
    assert trainer.step == checkpoint.load(checkpoint.latest(out))["step"]
    lock.release(out)  # what trainer.run would do at its end
