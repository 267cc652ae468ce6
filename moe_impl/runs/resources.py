"""What a run will cost before it runs: its host memory (the workflow's `mem_mb`), its device memory
and its wall time, estimated from measurements where there are some and from the model's size
where there are none. Read by the workflow (workflow/rules/common.smk: each job's mem_mb, through
moe_impl/train/runtable.py), by `python -m moe_impl plan` and by gpu-check; torch-free.

The measurements live beside the workflow (`workflow/resources/`):
  - peak_memory.yaml: measured host peaks (ru_maxrss, MiB) per preset and per benchmark entry,
    with the margin each job's mem_mb adds (the file says where each number comes from);
  - step_times.yaml: measured training steps on a device (gpu-check's workflow section): per
    preset the step time and the device's peak memory at a batch, and the training input's rate.

Rules (each estimate says which one it used, `source`):
  - host memory: a measured peak holds for a run of the same parameter count and at most the
    measured tokens per step (micro-batch), times the margin; otherwise the analytic estimate
    (parameters x 16 B with dense Adam, x 5 B with sparse expert gradients and the factored Adam
    from the layer's SPARSE_GRAD_MIN_EXPERTS experts on, + 1.5 GB), never below a measurement;
  - device memory: the measured peak less the parameter state (DEVICE_BYTES per parameter, fitted
    to the measured peaks) is activation memory, which grows with the positions of one forward
    pass (a micro-batch): scaled linearly from the measured batch, and the run's own parameter
    state added (a model measured at another parameter count, or a proxy, keeps the measured
    activations); micro-batches add their accumulated sparse expert gradients;
  - time: the measured step time scales linearly with the positions per step (every micro-batch
    is a forward and backward pass of its own); the training input, made ahead of the step by the
    trainer's producer, costs only what it takes beyond the step (max of the two), or all of it
    when made inline; evaluations cost a third of a training step per position (forward only).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import yaml

from moe_impl.layer.config import SPARSE_GRAD_MIN_EXPERTS

RESOURCES = Path(__file__).resolve().parents[2] / "workflow" / "resources"
PEAK_MEMORY_FILE = "peak_memory.yaml"
STEP_TIMES_FILE = "step_times.yaml"
BASE_MB = 1500  # the analytic estimate's allowance for the interpreter, torch and the corpus
EVAL_COST = 1 / 3  # an evaluated position costs a third of a trained one (forward only)


def load(name: str, folder: str | Path | None = None) -> dict:
    """A measurement file of workflow/resources (or `folder`), as a dict ({} when it is absent)."""
    path = Path(folder or RESOURCES) / name
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def bytes_per_param(num_experts: int) -> int:
    """Weights, gradients and Adam's two moments (16 B), or sparse expert gradients with the
    factored Adam (App. D: ~5 B) from SPARSE_GRAD_MIN_EXPERTS experts on."""
    return 5 if num_experts >= SPARSE_GRAD_MIN_EXPERTS else 16


def analytic_mem_mb(params: int, num_experts: int) -> int:
    """Host memory of a run without a measurement (MB = 10^6 bytes, Snakemake's mem_mb): its
    parameter state plus BASE_MB."""
    return int(BASE_MB + params * bytes_per_param(num_experts) / 1e6)


def measured_mem_mb(peak_mib: float, margin: float) -> int:
    """A measured peak (MiB, ru_maxrss) times the margin, in MB (Snakemake's mem_mb)."""
    return math.ceil(peak_mib * 2**20 / 1e6 * margin)


def estimate_mem_mb(measured: int | None, holds: bool, analytic: int) -> int:
    """The measurement where it holds; where it does not (more tokens per step than measured),
    the analytic estimate but not below the measurement; without one, the analytic estimate."""
    if measured is None:
        return analytic
    return measured if holds else max(measured, analytic)


class Estimate(NamedTuple):
    value: float
    source: str  # "measured: <where>", "scaled from <where>", or "analytic"


def train_mem_mb(
    peaks: dict, preset: str, *, params: int, num_experts: int, tokens_per_pass: int
) -> Estimate:
    """A training job's host memory (MB) from peak_memory.yaml's `train` entries (`peaks`: the
    whole file): the measured peak with the margin where the preset was measured at the same
    parameter count and at least `tokens_per_pass` positions per forward pass."""
    entry = (peaks.get("train") or {}).get(preset)
    analytic = analytic_mem_mb(params, num_experts)
    if entry is None or entry["params"] != params:
        return Estimate(analytic, "analytic")  # not measured, or another shape than measured
    measured = measured_mem_mb(entry["peak_mib"], peaks["margin"])
    holds = tokens_per_pass <= entry["tokens_per_step"]
    value = estimate_mem_mb(measured, holds, analytic)
    return Estimate(value, f"measured: {entry['source']}" if value == measured else "analytic")


# one expert of the benchmark's layer: 2 x d_model x d_hidden weights at `bench`'s defaults
# (--d-model 64 --d-hidden 128; the workflow's bench rule passes neither)
BENCH_EXPERT_PARAMS = 2 * 64 * 128


def bench_mem_mb(peaks: dict, specs, tokens: int) -> int:
    """The benchmark job's host memory (MB): `bench` measures each --experts entry (`specs`:
    moe_impl.bench.spec's ExpertSpec, `.config` and `.num_experts`) in a child process beside its
    parent, so the largest entry's child plus the parent (peak_memory.yaml's `bench` entries, which
    hold up to their measured `tokens`), else the analytic estimate."""
    estimates = []
    for spec in specs:
        entry = peaks["bench"].get(spec.config)
        analytic = analytic_mem_mb(spec.num_experts * BENCH_EXPERT_PARAMS, spec.num_experts)
        if entry is None:
            estimates.append(analytic)
            continue
        measured = measured_mem_mb(entry["peak_mib"] + peaks["bench_parent_mib"], peaks["margin"])
        estimates.append(estimate_mem_mb(measured, tokens <= entry["tokens"], analytic))
    return max(estimates)


# Device bytes per parameter (bf16 autocast on CUDA), fitted to gpu-check's measured peaks
# (docs/gpu.md, docs/workflow.md's gpu/ table): float32 weights and gradients, Adam's two moments
# and the bf16 copy for dense ones; from SPARSE_GRAD_MIN_EXPERTS experts the sparse expert
# gradients of a batch that touches nearly every expert, their bf16 copy and the factored Adam.
# tests/test_plan.py checks that the sparse value gives back MoE-131072-h's measured peak at twice
# the expert weights.
DEVICE_BYTES = {"dense": 16, "sparse": 11}
# Gradient accumulation over micro-batches (moe_impl/train/micro.py): while a pass's sparse expert
# gradient is added to the accumulated one and coalesced, up to two more float32 copies of the
# expert weights than one pass holds (8 B a parameter): the concatenation of the two, then its
# coalesced sum (a pass that touches nearly every expert, as gpu.yaml's news100b passes do).
ACCUMULATION_BYTES = 8


def device_bytes_per_param(num_experts: int) -> int:
    return DEVICE_BYTES["sparse" if num_experts >= SPARSE_GRAD_MIN_EXPERTS else "dense"]


def device_peak_gib(
    measured: dict | None,
    *,
    params: int,
    num_experts: int,
    tokens_per_pass: int,
    micro_batches: int = 1,
) -> Estimate | None:
    """A run's device memory (GiB) from a step_times.yaml model entry measured at
    `measured["tokens_per_step"]` positions in `measured["micro_batches"]` passes (default 1) with
    `measured["params"]` parameters: the run's own parameter state, plus the measurement's
    activations (its peak less its parameter state) scaled from its positions per pass to
    `tokens_per_pass`, plus the accumulated sparse gradients of micro-batches where the
    measurement had none; None without a measurement."""
    if not measured:
        return None
    per_param = device_bytes_per_param(num_experts)
    state = params * per_param / 2**30
    measured_params = measured.get("params", params)
    measured_micro = measured.get("micro_batches", 1)  # its peak holds its own accumulation
    activations = max(measured["peak_gib"] - measured_params * per_param / 2**30, 0.0)
    scale = tokens_per_pass / (measured["tokens_per_step"] / measured_micro)
    sparse = num_experts >= SPARSE_GRAD_MIN_EXPERTS
    accumulates = micro_batches > 1 and measured_micro == 1 and sparse
    accumulation = params * ACCUMULATION_BYTES / 2**30 if accumulates else 0.0
    exact = scale == 1 and measured_params == params and not accumulation
    how = "measured" if exact else "scaled from"
    return Estimate(state + activations * scale + accumulation, f"{how} {measured['source']}")


def run_hours(steps: int, step_s: float, eval_positions: int, tokens_per_step: int) -> float:
    """Hours of a run: its steps at `step_s` each, plus its evaluated positions at EVAL_COST of a
    trained position."""
    eval_s = eval_positions / tokens_per_step * step_s * EVAL_COST
    return (steps * step_s + eval_s) / 3600


def step_seconds(
    measured: dict | None,
    *,
    tokens_per_step: int,
    input_tokens_per_s: float | None,
    prefetch: bool,
) -> Estimate | None:
    """Seconds of one training step of `tokens_per_step` positions (all its micro-batches) from a
    step_times.yaml model entry: the model's step scaled linearly, then the input: the part of it
    beyond the step when made ahead (`prefetch`), all of it when made inline. None without a
    measurement."""
    if not measured:
        return None
    model_s = measured["step_ms"] / 1e3 * tokens_per_step / measured["tokens_per_step"]
    input_s = tokens_per_step / input_tokens_per_s if input_tokens_per_s else 0.0
    total = max(model_s, input_s) if prefetch else model_s + input_s
    return Estimate(total, f"measured {measured['source']}")
