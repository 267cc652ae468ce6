"""The workflow's logic in the package, without Snakemake (workflow/rules/common.smk calls it): a
run's processes and the rule that they share its batches (moe_impl/train/processes.py, also the
trainer's), the run table (moe_impl/train/runtable.py), the benchmark job's memory estimate
(moe_impl/runs/resources.py) and the onstart checks (moe_impl/train/preflight.py), against closed
forms and their exact messages. The dry runs and hooks under Snakemake are tests/test_workflow*.py.
Unit tier."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moe_impl.bench.spec import parse_experts
from moe_impl.layer.config import SPARSE_GRAD_MIN_EXPERTS
from moe_impl.model.flops import total_params
from moe_impl.model.presets import ALL_PRESETS, LM1B_VOCAB
from moe_impl.runs import resources
from moe_impl.runs.sweeps import PlannedRun, planned_runs
from moe_impl.train import preflight, processes, runtable
from moe_impl.train.config import dump, load_config
from moe_impl.train.identity import fingerprint

ROOT = Path(__file__).resolve().parents[1]
SMOKE_TRAIN = ROOT / "config" / "train" / "smoke.yaml"


def smoke_config(**more) -> dict:
    """config/smoke.yaml with the schema's defaults of the keys read here, and `more`."""
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    return {"gpus_per_run": 1, "nodes_per_run": 1, **config, **more}


# --- processes ----------------------------------------------------------------------------------


def test_a_run_has_gpus_per_run_processes_on_each_node():
    assert processes.per_run({"gpus_per_run": 0, "nodes_per_run": 1}) == 1  # CPU: one process
    assert processes.per_run({"gpus_per_run": 4, "nodes_per_run": 2}) == 8
    assert processes.named({"gpus_per_run": 3, "nodes_per_run": 1}) == (
        "gpus_per_run x nodes_per_run = 3 processes"
    )


def test_every_batch_must_split_evenly_over_the_processes():
    processes.check_divisible({"train.batch_size": 12, "eval.batch_size": 6}, 3, "three")
    with pytest.raises(ValueError) as err:
        processes.check_divisible({"train.batch_size": 12, "eval.batch_size": 4}, 3, "three")
    assert str(err.value) == (
        "eval.batch_size=4 must be divisible by three: each takes an equal share of the rows"
    )


def test_slurm_asks_for_one_node_or_whole_nodes_with_one_task_each():
    one = processes.slurm_resources({"gpus_per_run": 4, "nodes_per_run": 1})
    assert one == {"gpu": 4, "nodes": 1, "slurm_extra": ""}
    several = processes.slurm_resources({"gpus_per_run": 4, "nodes_per_run": 2})
    assert several == {
        "gpu": 0,
        "nodes": 2,
        "slurm_extra": "--gpus-per-node=4 --ntasks-per-node=1 --exclusive",
    }


# --- the run table ------------------------------------------------------------------------------


def test_the_run_table_is_the_planned_runs_resolved_by_the_training_config():
    config, peaks = smoke_config(), resources.load(resources.PEAK_MEMORY_FILE)
    runs = runtable.build_runs(config, peaks, root=ROOT)
    planned = planned_runs(config)
    assert list(runs) == [(p.sweep, p.run) for p in planned]
    for p in planned:
        run = runs[(p.sweep, p.run)]
        cfg = load_config([SMOKE_TRAIN], p.overrides)
        assert (run.preset, run.overrides, run.config) == (p.preset, p.overrides, cfg)
        assert run.fingerprint == fingerprint(cfg)
        assert run.params == total_params(run.model)
        assert run.model.vocab_size == ALL_PRESETS[p.preset].vocab_size  # synthetic corpus
        per_pass = cfg.train.batch_size * cfg.train.seq_len
        experts = run.model.num_experts
        host = resources.train_mem_mb(
            peaks, p.preset, params=run.params, num_experts=experts, tokens_per_pass=per_pass
        )
        assert run.host_mem == host and run.mem_mb == int(host.value)
        assert run.corpus == "synthetic" and not run.needs_cuda


def test_a_run_on_lm1b_has_lm1b_s_vocabulary_whatever_its_preset():
    overrides = ["model.preset=cpu/MoE-4", "data.corpus=lm1b", "data.path=/nowhere"]
    run = runtable.resolve(PlannedRun("s", "r", "cpu/MoE-4", overrides), SMOKE_TRAIN, {})
    assert run.model.vocab_size == LM1B_VOCAB != ALL_PRESETS["cpu/MoE-4"].vocab_size
    assert run.host_mem.source == "analytic"  # no measurement given


def test_host_memory_counts_one_forward_pass_of_the_micro_batches():
    """A measurement at B x T positions holds for a step of 2 B x T in two micro-batches."""
    planned = PlannedRun("s", "r", "cpu/MoE-4", ["model.preset=cpu/MoE-4"])
    cfg = load_config([SMOKE_TRAIN], planned.overrides)
    params = total_params(runtable.run_model(cfg, "cpu/MoE-4"))
    per_step = cfg.train.tokens_per_step
    # a peak below the analytic estimate: it holds only where it was measured
    entry = {"peak_mib": 1, "params": params, "tokens_per_step": per_step, "source": "m"}
    peaks = {"margin": 1.0, "train": {"cpu/MoE-4": entry}}
    measured = resources.measured_mem_mb(1, 1.0)
    doubled = [f"train.batch_size={2 * cfg.train.batch_size}"]
    whole = PlannedRun(*planned[:3], planned.overrides + doubled)
    split = PlannedRun(*planned[:3], [*whole.overrides, "train.micro_batches=2"])
    assert runtable.resolve(planned, SMOKE_TRAIN, peaks).mem_mb == measured
    assert runtable.resolve(split, SMOKE_TRAIN, peaks).host_mem.source == "measured: m"
    assert runtable.resolve(whole, SMOKE_TRAIN, peaks).host_mem.source == "analytic"


def test_a_batch_that_does_not_split_over_the_processes_names_the_config_entry():
    with pytest.raises(ValueError) as err:
        runtable.build_runs(smoke_config(gpus_per_run=3), {}, root=ROOT)
    assert str(err.value).startswith("config sweeps.lm1b.models[0] (MoE-4): train.batch_size=")
    assert str(err.value).endswith(
        " must be divisible by gpus_per_run x nodes_per_run = 3 processes: each takes an equal "
        "share of the rows"
    )


def test_a_cuda_run_needs_cuda():
    planned = PlannedRun("s", "r", "cpu/MoE-4", ["model.preset=cpu/MoE-4", "train.device=cuda:1"])
    assert runtable.resolve(planned, SMOKE_TRAIN, {}).needs_cuda


# --- the benchmark's memory ---------------------------------------------------------------------


def test_the_benchmark_job_holds_its_largest_entry_beside_the_parent():
    specs = parse_experts("4,256-h,1024")
    entry = {"peak_mib": 400, "tokens": 4096}
    peaks = {"margin": 1.15, "bench_parent_mib": 300, "bench": {"4": entry, "256-h": entry}}
    analytic = resources.analytic_mem_mb(1024 * resources.BENCH_EXPERT_PARAMS, 1024)
    measured = resources.measured_mem_mb(400 + 300, 1.15)
    assert resources.bench_mem_mb(peaks, specs, 4096) == max(measured, analytic)
    assert resources.bench_mem_mb(peaks, specs[:2], 4096) == measured
    more = resources.analytic_mem_mb(256 * resources.BENCH_EXPERT_PARAMS, 256)
    assert resources.bench_mem_mb(peaks, specs[:2], 8192) == max(measured, more)


def test_the_sparse_expert_state_starts_at_the_layer_s_threshold():
    n = SPARSE_GRAD_MIN_EXPERTS
    assert resources.bytes_per_param(n - 1) == 16 and resources.bytes_per_param(n) == 5
    assert resources.device_bytes_per_param(n - 1) == resources.DEVICE_BYTES["dense"]
    assert resources.device_bytes_per_param(n) == resources.DEVICE_BYTES["sparse"]


# --- the onstart checks -------------------------------------------------------------------------


def fake_python(tmp_path: Path, output: str, code: int = 0) -> str:
    """An executable that answers the CUDA probe with `output`."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    path.chmod(0o755)
    return str(path)


def test_the_probe_says_why_cuda_is_missing_or_nothing(tmp_path):
    assert preflight.cuda_missing(fake_python(tmp_path, "False 2.13.0+cpu")) == (
        "torch 2.13.0+cpu sees none"
    )
    assert preflight.cuda_missing(fake_python(tmp_path, "True 2.13.0")) is None
    assert preflight.cuda_missing(fake_python(tmp_path, "False 2.13.0", code=1)) is None
    assert preflight.cuda_missing(str(tmp_path / "no-python")) is None


TRAIN_CUDA = ("train", SimpleNamespace(needs_cuda=True))
TRAIN_CPU = ("train", SimpleNamespace(needs_cuda=False))


def test_jobs_that_need_cuda_stop_the_workflow_where_there_is_none(tmp_path):
    cpu_torch = fake_python(tmp_path, "False 2.13.0+cpu")
    with pytest.raises(preflight.Refused) as err:
        preflight.check_cuda(
            [TRAIN_CUDA, ("bench", None)], "cpu", False, "config/gpu.yaml", cpu_torch
        )
    assert str(err.value) == (
        "config/gpu.yaml trains on cuda (train.device=cuda) but this machine has no CUDA device "
        "(torch 2.13.0+cpu sees none); no job was started. Run it where a GPU and a CUDA build of "
        "PyTorch are, or plan it here with `snakemake -n`."
    )
    with pytest.raises(preflight.Refused, match=r"\(bench\.device=cuda\)"):
        preflight.check_cuda([TRAIN_CPU, ("bench", None)], "cuda", False, "c.yaml", cpu_torch)
    # nothing needs CUDA: nothing is probed (the probe would fail)
    assert preflight.check_cuda([TRAIN_CPU, ("bench", None)], "cpu", False, "c", "/no") == []


def test_several_cuda_jobs_without_a_gpu_limit_are_a_warning(tmp_path):
    cuda_torch = fake_python(tmp_path, "True 2.13.0")
    jobs = [TRAIN_CUDA, TRAIN_CUDA]
    [warning] = preflight.check_cuda(jobs, "cpu", False, "c", cuda_torch)
    assert warning.startswith("2 jobs ask for GPUs (resources: gpu) but no --resources gpu=N")
    assert preflight.check_cuda(jobs, "cpu", True, "c", cuda_torch) == []
    assert preflight.check_cuda(jobs[:1], "cpu", False, "c", cuda_torch) == []


def test_the_config_is_named_as_the_user_named_it():
    assert preflight.config_names([]) == "config/config.yaml"
    named = [os.path.abspath("config/gpu.yaml"), "b.yaml"]
    assert preflight.config_names(named) == "config/gpu.yaml, b.yaml"


def test_jobs_above_the_budget_and_a_budget_above_free_memory_are_warnings():
    run = SimpleNamespace(key=("lm1b", "MoE-4"), mem_mb=3000)
    jobs = [("train", run), ("bench", None), ("collect", None)]
    script = Path("mem_budget.py")
    assert preflight.job_mem_mb(jobs[1], 900) == 900 and preflight.job_mem_mb(jobs[2], 900) == 0
    over, above = preflight.check_memory(
        jobs, bench_mem_mb=2500, budget=2000, free=1500, script=script
    )
    assert over.startswith(
        "bench (2500 MB), lm1b/MoE-4 (3000 MB): more memory than the budget, --resources "
        "mem_mb=2000. Each will run alone"
    )
    assert above == (
        "The memory budget mem_mb=2000 is more than this machine has free now (1500 MB after a "
        "reserve): jobs started together may be killed. `make reproduce` sets it from free "
        "memory, or pass --resources mem_mb=$(python mem_budget.py)."
    )
    fits = preflight.check_memory(jobs, bench_mem_mb=100, budget=4000, free=None, script=script)
    assert fits == []


def test_the_machine_budget_comes_from_the_workflow_script(tmp_path):
    script = ROOT / "workflow" / "scripts" / "mem_budget.py"
    if sys.platform == "linux":
        assert isinstance(preflight.machine_free_mb(script), int)
    assert preflight.machine_free_mb(tmp_path / "missing.py") is None


def test_a_run_directory_with_other_values_is_set_aside_whole(tmp_path):
    cfg = load_config([SMOKE_TRAIN])
    runs = tmp_path / "runs"
    same, other, broken = (runs / "lm1b" / name for name in ("same", "other", "broken"))
    for directory in (same, other, broken):
        directory.mkdir(parents=True)
        (directory / "config.yaml").write_text(dump(cfg))
    (broken / "config.yaml").write_text("train: {lr: [}")
    changed = load_config([SMOKE_TRAIN], ["train.lr=0.5"])
    job = ("train", SimpleNamespace(sweep="lm1b", run="same", config=cfg))
    assert list(preflight.set_aside_changed_runs([job, ("bench", None)], str(runs))) == []
    assert same.is_dir()
    [line] = preflight.set_aside_changed_runs(
        [("train", SimpleNamespace(sweep="lm1b", run="other", config=changed))], str(runs)
    )
    assert line.startswith(f"{runs}/lm1b/other: config changed (train.lr {cfg.train.lr} -> 0.5)")
    [moved] = (runs / "lm1b").glob(".other.replaced-*")
    assert line.endswith(f"; moved the old run to {moved}") and not other.exists()
    assert (moved / "config.yaml").read_text() == dump(cfg)  # every file kept
    why = preflight.set_aside_changed(broken, cfg)
    assert "cannot be read" in why and not broken.exists()
    assert preflight.set_aside_changed(runs / "lm1b" / "new", cfg) is None  # nothing there
