"""The one-GPU reproduction, config/gpu.yaml: a dry run plans every run on any machine (this one
has no GPU), each training job asks for one GPU (`--resources gpu=1` queues them), the plan is
moe_impl.runs.sweeps.planned_runs's, and a real run on a machine without CUDA stops before any job
with one line saying why.

Integration tier: every test starts snakemake."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, SNAKEMAKE, job_counts, planned_runs, snakemake, workdir

from moe_impl.runs import sweeps

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not SNAKEMAKE.exists(), reason="snakemake (the `workflow` extra) not installed"
    ),
]
GPU_CONFIG = "config/gpu.yaml"
NO_CUDA = re.compile(
    r"^config/gpu\.yaml trains on cuda \(train\.device=cuda\) but this machine has no CUDA "
    r"device \(torch \S+ sees none\); no job was started\..*`snakemake -n`\.$",
    re.M,
)


def has_cuda() -> bool:
    """Whether the `python` the workflow's jobs run sees a CUDA device."""
    probe = "import torch; print(torch.cuda.is_available())"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return proc.stdout.strip() == "True"


def train_blocks(stdout: str) -> list[str]:
    """The text of each train job of a `-n -p` dry run."""
    blocks = re.split(r"\n\[\w{3} \w{3} [^\]]*\]\n", stdout)
    return [b for b in blocks if re.search(r"^(?:local)?rule train:", b, re.M)]


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory) -> str:
    wd = workdir(tmp_path_factory.mktemp("gpu"))
    proc = snakemake(wd, "-n", "-p", "--cores", "16", "--configfile", GPU_CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stdout


def test_a_dry_run_plans_every_run_of_the_gpu_config(gpu_plan):
    cfg = yaml.safe_load((ROOT / GPU_CONFIG).read_text())
    want = {f"{r.sweep}/{r.run}" for r in sweeps.planned_runs(cfg)}
    assert len(want) == 24
    assert planned_runs(gpu_plan) == want
    jobs = job_counts(gpu_plan)
    assert jobs["train"] == len(want)
    assert jobs["bench"] == jobs["collect"] == jobs["figures"] == 1
    assert "check_data" not in jobs  # the synthetic corpus


def test_every_training_job_asks_for_one_gpu_and_trains_as_planned(gpu_plan):
    """`snakemake --resources gpu=1` then runs one at a time; the shell command carries exactly the
    overrides planned_runs lists, in its order."""
    cfg = yaml.safe_load((ROOT / GPU_CONFIG).read_text())
    planned = {(r.sweep, r.run): r.overrides for r in sweeps.planned_runs(cfg)}
    blocks = train_blocks(gpu_plan)
    assert len(blocks) == len(planned)
    for block in blocks:
        resources = re.search(r"^\s*resources: (.*)$", block, re.M)[1]
        assert re.search(r"\bgpu=1\b", resources) and "nodes=1" in resources, block
        sweep, run = re.search(r"wildcards: sweep=(\w+), run=(\S+)", block).groups()
        command = block[block.index("launch.sh") :].splitlines()[0]
        assert command.startswith("launch.sh 1 1 train --config config/train/gpu.yaml "), block
        words = shlex.split(command)
        sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        assert sets[:-1] == planned[(sweep, run)], block  # then train.threads
        assert sets[-1] == "train.threads=4"
    bench = re.search(r"rule bench:.*?\n\n", gpu_plan, re.S)[0]
    assert re.search(r"\bgpu=1\b", bench) and "--device cuda" in bench


def test_data_path_switches_every_run_to_lm1b(tmp_path):
    wd = workdir(tmp_path)
    proc = snakemake(
        wd,
        "-n",
        "-p",
        "--cores",
        "16",
        "--configfile",
        GPU_CONFIG,
        "--config",
        "data_path=data/lm1b",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout)["check_data"] == 1  # the archive is checked before training
    for block in train_blocks(proc.stdout):
        for override in ("data.path=data/lm1b", "data.corpus=lm1b", "model.softmax_samples=4096"):
            assert f"--set {override} " in block, block


def test_a_real_run_without_cuda_stops_before_any_job(tmp_path):
    """On this CPU-only machine: exit 1, the one-line reason, and no job started (no run
    directory, no log, not even the MLflow store's)."""
    if has_cuda():
        pytest.skip("this machine has a CUDA device")
    wd = workdir(tmp_path)
    proc = snakemake(wd, "--cores", "2", "--configfile", GPU_CONFIG)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert NO_CUDA.search(out), out[-3000:]
    assert not (wd / "results").exists() and not (wd / "logs").exists()
    assert "rule train" not in out and "localrule tracking_init" not in out
    # a dry run of the same config, on the same machine, plans it all
    dry = snakemake(wd, "-n", "--cores", "2", "--configfile", GPU_CONFIG)
    assert dry.returncode == 0 and job_counts(dry.stdout)["train"] == 24
