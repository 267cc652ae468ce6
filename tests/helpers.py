"""Helpers shared by several test modules (and by the spawned ranks of parallel_workers).

Test modules import from here, never from each other: a test module is collected once, and
importing it from another one would collect its tests twice and tie the two files together.

- tiny training runs: `TINY`, `tiny`, `losses`, `run_until_killed`, `lm1b_overrides`;
- layers whose routing depends on x: `randomise_gates`;
- corpus fixtures in the released layouts: `make_archive` (LM1B), `make_wikitext` (WikiText-103).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

    from moe_impl.train.config import RunConfig
    from moe_impl.train.loop import Trainer

# --- tiny training runs -------------------------------------------------------------------------

# a run of a few seconds: 12 steps of 8 x 24 positions on a small corpus
TINY = [
    "model.d_model=16",
    "model.lstm_layers=[[16, null], [16, null]]",
    "model.d_hidden=16",
    "model.num_experts=8",
    "model.k=2",
    "data.synthetic.vocab_size=48",
    "data.synthetic.num_topics=4",
    "data.synthetic.max_len=40",
    "train.batch_size=8",
    "train.seq_len=24",
    "train.tokens=2304",
    "train.warmup_steps=3",
    "train.lr=0.01",
    "train.checkpoint_every=5",
    "train.progress=none",
    "train.threads=1",
    "eval.tokens=600",
    "eval.batch_size=4",
    "eval.seq_len=32",
    "tracking.enabled=false",  # tests of MLflow logging turn it on with their own store
]
# a hierarchical MoE of 16 experts (4 groups of 4, k = 2 + 2) on the cpu/MoE-256-h preset
HIER_16 = [
    "model.preset=cpu/MoE-256-h",
    "model.num_experts=16",
    "model.num_groups=4",
    "model.group_size=4",
    "model.k_primary=2",
    "model.k_secondary=2",
    "model.k=null",
]


def tiny(*more: str) -> RunConfig:
    """The resolved config of the TINY run with `more` overrides on top."""
    from moe_impl.train.config import load_config

    return load_config([], [*TINY, *more])


def set_args(overrides) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]: overrides as train's command line."""
    return [a for s in overrides for a in ("--set", s)]


def losses(run_dir: Path) -> list[float]:
    """The training losses a run directory recorded, in step order."""
    from moe_impl.runs import rundir

    return [r["loss"] for r in rundir.read_metrics(run_dir) if r["kind"] == "train"]


class Killed(Exception):
    """What `run_until_killed` raises in place of a SIGKILL."""


def run_until_killed(trainer: Trainer, at_step: int) -> None:
    """Run, and die like a killed process just before step `at_step` (0-based) trains."""
    step = trainer.train_step

    def dies():
        if trainer.step == at_step:
            raise Killed
        return step()

    trainer.train_step = dies
    with pytest.raises(Killed):
        trainer.run()


def whole_and_killed(root: Path) -> dict[str, Path]:
    """A finished TINY run ("whole", started from the command line with TINY as --set) and the
    same run killed before step 8 ("killed", its last checkpoint at step 5), under root."""
    from moe_impl.cli import main
    from moe_impl.train import checkpoint
    from moe_impl.train.loop import Trainer

    assert main(["train", "--out", str(root / "whole"), *set_args(TINY)]) == 0
    run_until_killed(Trainer(tiny(), root / "killed"), at_step=8)
    assert checkpoint.latest(root / "killed").name == "step-00000005.pt"
    return {"whole": root / "whole", "killed": root / "killed"}


def copy_run(runs: dict[str, Path], which: str, tmp_path: Path) -> Path:
    """A copy of runs[which] (whole_and_killed) at tmp_path/run, for a test to change."""
    out = tmp_path / "run"
    shutil.copytree(runs[which], out)
    return out


def lm1b_overrides(root: Path) -> list[str]:
    """Overrides that train on the LM1B fixture at `root` (see `make_archive`) for 3 epochs."""
    return [
        "data.corpus=lm1b",
        f"data.path={root}",
        f"data.cache_dir={root.parent / 'cache'}",
        "data.max_train_shards=3",
        "model.softmax_samples=6",  # the importance-sampled training softmax (App. C.1)
        "train.tokens=null",
        "train.epochs=3",
        "train.batch_size=2",
        "train.seq_len=8",
        "train.checkpoint_every=4",
        "eval.tokens=null",
    ]


# --- layers -------------------------------------------------------------------------------------


def randomise_gates(layer: torch.nn.Module, scale: float = 0.7, seed: int = 7) -> None:
    """Zero-initialised gates route at random; random weights make the routing depend on x."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "gate" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# --- corpus fixtures ----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> None:
    """`lines`, one per line with a final newline, in UTF-8; creates the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


LM1B_WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ",", "."]
LM1B_TEST = ["the cat sat on the mat .", "a zzyzx dog ran , qqq .", "U.S. ."]  # 3 OOV words
LM1B_VALID = ["the dog sat .", "a cat ran ."]
SCORED_TEST = sum(len(s.split()) + 1 for s in LM1B_TEST)  # words + </S> per sentence


def lm1b_train_sentences(shard: int) -> list[str]:
    """Ten sentences per shard; every LM1B_WORDS entry is seen often, 'rare<shard>' once or twice."""
    rng = np.random.default_rng(shard)
    lines = [" ".join(rng.choice(LM1B_WORDS, size=int(rng.integers(2, 8)))) for _ in range(9)]
    return [*lines, f"the rare{shard} cat rare{shard % 2} ."]


def make_archive(base: Path, *, shards=(1, 2, 3), trap: bool = True, valid: bool = True) -> Path:
    """The LM1B archive folder (docs/data.md) under `base` with `shards` training shards,
    heldout-00000/00001 and the trap file; returns the archive folder."""
    from moe_impl.data.lm1b import ARCHIVE_DIR, HELDOUT_DIR, TEST_FILE, TRAIN_DIR, VALID_FILE

    top = base / ARCHIVE_DIR
    for n in shards:
        write_lines(top / TRAIN_DIR / f"news.en-{n:05d}-of-00100", lm1b_train_sentences(n))
    write_lines(top / HELDOUT_DIR / TEST_FILE, LM1B_TEST)
    if valid:
        write_lines(top / HELDOUT_DIR / VALID_FILE, LM1B_VALID)
    if trap:  # the union of all heldout shards, which must never be read (docs/data.md)
        union = LM1B_TEST + LM1B_VALID + ["more heldout text ."] * 5
        write_lines(top / HELDOUT_DIR / "news.en-00000-of-00100", union)
    return top


WIKI_TRAIN = [
    " = Title = ",
    "",
    " the cat sat on the mat . ",
    " the dog sat on a <unk> . ",
    "",
    " the end ",
]
WIKI_TEST = [" = Other = ", "", " the bird sat on the cat . ", ""]  # `bird`, `Other` are OOV
WIKI_VALID = [" the mat . "]


def make_wikitext(base: Path, *, valid: bool = True) -> Path:
    """The WikiText-103 layout (wiki.{train,valid,test}.tokens) under `base`; returns its folder."""
    folder = base / "wikitext-103"
    write_lines(folder / "wiki.train.tokens", WIKI_TRAIN)
    write_lines(folder / "wiki.test.tokens", WIKI_TEST)
    if valid:
        write_lines(folder / "wiki.valid.tokens", WIKI_VALID)
    return folder


# --- the workflow, run by snakemake in a copy --------------------------------------------------

SNAKEMAKE = Path(sys.executable).with_name("snakemake")  # the `workflow` extra, next to python
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow (not of results/): tests never touch the repository's outputs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config", "workflow", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def snakemake(
    cwd: Path, *args: str, timeout: int = 120, pythonpath: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    # the package comes from the repository (sys.path of `python -m`), not from the copy
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(
        [str(SNAKEMAKE), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": env_path,
            "PYTHONPATH": ":".join(map(str, [*pythonpath, ROOT])),
            "HOME": str(cwd),
        },
    )


def planned_runs(stdout: str) -> set[str]:
    return set(re.findall(r"results/runs/(\w+/[\w.-]+)/summary\.json", stdout))


def job_counts(stdout: str) -> dict[str, int]:
    """The dry run's "Job stats" table: rule -> number of jobs ({} when nothing is to be done)."""
    if "Job stats:" not in stdout:
        return {}
    table = stdout[stdout.index("Job stats:") :].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


class NoWatchdog:
    """threading.Timer's stand-in: in this process a failing first step must not os._exit pytest."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        pass

    def cancel(self):
        pass
