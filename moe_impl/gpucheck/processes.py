"""The sections that start processes: the real trainer on the device for about a minute with NVML
telemetry, and `bench --distributed` under torchrun with one process (NCCL on a GPU, gloo on a
CPU). Both run `python -m moe_impl` from this checkout, as a user would."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from moe_impl.gpucheck import ROOT
from moe_impl.gpucheck.report import CheckFailed
from moe_impl.gpucheck.sizes import Sizes

NVML_KEYS = ("gpu_utilization_pct", "gpu_memory_used_mb", "gpu_power_w", "gpu_sm_clock_mhz")


def _run(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> int:
    """Run `cmd` from the checkout with its output in `log_path`; CheckFailed on a timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"
    with open(log_path, "w") as log:
        try:
            return subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{' '.join(cmd[:6])} ... ran past {timeout_s:g} s") from None


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " / ".join(text[-lines:]) or "no output"


def check_trainer(device: torch.device, sizes: Sizes, out_dir: Path) -> dict:
    """`python -m moe_impl train` on the device: it finishes, writes metrics.jsonl and summary.json,
    and on a GPU the NVML readings are in both. MLflow where installed (a store in out_dir),
    otherwise tracking off, with one warning in the results."""
    run_dir = out_dir / "trainer_run"
    tokens = sizes.trainer_steps * sizes.trainer_batch * sizes.trainer_seq
    settings = [
        f"model.preset={sizes.trainer_preset}",
        f"train.device={device}",
        f"train.dtype={'bfloat16' if device.type == 'cuda' else 'float32'}",
        f"train.batch_size={sizes.trainer_batch}",
        f"train.seq_len={sizes.trainer_seq}",
        f"train.tokens={tokens}",
        "train.log_every=10",
        f"train.checkpoint_every={sizes.trainer_steps}",
        "train.progress=lines",
        f"eval.tokens={sizes.trainer_eval_tokens}",
        "telemetry.interval_s=0.5",
    ]
    if device.type != "cuda":  # the batch producer (2 processes by default on CUDA) on CPU too
        settings.append("train.prefetch_workers=1")
    warnings = []
    if importlib.util.find_spec("mlflow") is None:
        settings.append("tracking.enabled=false")
        warnings.append("mlflow is not installed: the trainer ran with tracking.enabled=false")
        print(f"[gpu-check] warning: {warnings[-1]}", file=sys.stderr)
    else:
        settings.append(f"tracking.uri=sqlite:///{(out_dir / 'mlflow.db').resolve()}")
    cmd = [
        sys.executable,
        "-m",
        "moe_impl",
        "train",
        "--config",
        "config/train/cpu.yaml",
        "--out",
        str(run_dir),
        "--replace-changed",
        "--resume",
    ]
    cmd += [arg for setting in settings for arg in ("--set", setting)]
    log_path = out_dir / "trainer.log"
    code = _run(cmd, log_path, sizes.trainer_timeout_s)
    if code != 0:
        raise CheckFailed(f"train exited with code {code}: {_tail(log_path)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    results = {
        "command": "python -m moe_impl train --config config/train/cpu.yaml --set "
        + " ".join(settings),
        "steps": len(train_records),
        "wall_time_s": summary.get("wall_time_s"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "tflops_per_device": summary.get("tflops_per_device"),
        "mfu": summary.get("mfu"),
        "test_perplexity": summary.get("test_perplexity") or summary.get("perplexity"),
        "prefetch_workers": summary.get("prefetch_workers"),
        "input_wait_fraction": summary.get("input_wait_fraction"),
        "warnings": "; ".join(warnings) or None,
    }
    if device.type == "cuda":
        logged = [r for r in train_records if any(k in r for k in NVML_KEYS)]
        in_summary = sorted(k for k in summary if k.startswith("gpu_"))
        results.update(nvml_records=len(logged), summary_gpu_keys=", ".join(in_summary))
        if not logged:
            raise CheckFailed(f"no NVML readings ({', '.join(NVML_KEYS)}) in metrics.jsonl")
        last = logged[-1]
        results.update({k: last.get(k) for k in NVML_KEYS})
        if not in_summary:
            raise CheckFailed("no gpu_* telemetry in summary.json")
    return {"run": results}


def check_distributed(device: torch.device, sizes: Sizes, out_dir: Path) -> dict:
    """`bench --distributed` under torchrun with one process: NCCL on CUDA, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    bench_out = out_dir / "bench_distributed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "moe_impl",
        "bench",
        "--distributed",
        "--device",
        device.type,
        "--backend",
        backend,
        "--experts",
        sizes.nccl_experts,
        "--tokens",
        str(sizes.nccl_tokens),
        "--reps",
        "3",
        "--warmup",
        "1",
        "--out",
        str(bench_out),
    ]
    log_path = out_dir / "bench_distributed.log"
    code = _run(cmd, log_path, 150)
    if code != 0:
        raise CheckFailed(
            f"torchrun ... bench --distributed exited with code {code}: {_tail(log_path)}"
        )
    rows = json.loads((bench_out / "bench_distributed.json").read_text())
    keep = ("config", "rank", "tokens", "local_experts", "step_ms", "comm_ms", "compute_ms")
    return {"backend": backend, "rows": [{k: r.get(k) for k in keep} for r in rows]}
