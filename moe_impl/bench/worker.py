"""The child process of `python -m moe_impl bench`: build one configuration, time it against the
dense FFN, report MEASURED. bench.py is the parent: arguments, one child per configuration, output.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from moe_impl import runtime, telemetry
from moe_impl.bench.spec import ExpertSpec, gate_outputs, train_flops
from moe_impl.layer import balancing
from moe_impl.layer.flat import MoE
from moe_impl.layer.hierarchical import HierarchicalMoE

EXIT_TOO_SLOW = 86  # a child's exit code when its first step exceeds --max-seconds-per-step
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEASURED = (  # noqa: SIM905 (what the child process reports; NaN in a skipped row)
    "moe_ms_median moe_ms_min dense_ms_median dense_ms_min moe_us_per_token dense_us_per_token "
    "ratio_median ratio_min moe_gflops dense_gflops peak_gflops mfu peak_mem_mb "
    "active_experts tokens_per_active_expert cv_load cv_tokens_per_expert max_over_mean_load"
).split()


def build_moe(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> nn.Module:
    if spec.hierarchical:
        return HierarchicalMoE(d_model, d_hidden, spec.num_groups, spec.group_size)
    return MoE(d_model, d_hidden, spec.num_experts, k=k)


def measure(cfg: dict) -> dict:
    """Child process: build both layers, alternate timed MoE and dense steps, return MEASURED."""
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    if device.type == "cpu":
        runtime.flush_denormals()  # as training does (moe_impl/runtime.py)
    # the peak training's MFU uses (summary.json): the datasheet table on GPUs, a GEMM measured
    # here, at the configuration's thread count, on CPUs; None where the device is unknown
    peak, _ = telemetry.resolve_peak_flops(cfg["device"], cfg["dtype"])
    spec = ExpertSpec(*(cfg[key] for key in ExpertSpec._fields))
    d, h, k, tokens = cfg["d_model"], cfg["d_hidden"], cfg["k"], cfg["tokens"]
    moe = build_moe(spec, d, h, k).to(device).train()
    dense = nn.Sequential(
        nn.Linear(d, k * h, bias=False), nn.ReLU(), nn.Linear(k * h, d, bias=False)
    )
    dense = dense.to(device).train()
    x_BD = torch.randn(tokens, d, device=device, requires_grad=True)
    # NOTE: plain SGD accepts the sparse expert gradients (>= 4096 experts) and keeps no state.
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3) for m in (moe, dense) if cfg["optimizer"]}

    def step(model: nn.Module) -> tuple[float, object]:
        model.zero_grad(set_to_none=True)
        x_BD.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(x_BD)
        is_moe = model is moe
        loss = (out.y if is_moe else out).float().square().mean()
        (loss + out.aux_loss if is_moe else loss).backward()
        if model in opts:
            opts[model].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out.stats if is_moe else None

    # The first MoE step estimates the step time: a watchdog ends the child if it runs too long.
    watchdog = threading.Timer(cfg["max_seconds"], os._exit, args=(EXIT_TOO_SLOW,))
    watchdog.daemon = True
    watchdog.start()
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    stats = []
    for i in range(cfg["warmup"] + cfg["reps"]):
        moe_s, moe_stats = step(moe)
        watchdog.cancel()
        dense_s, _ = step(dense)
        if i >= cfg["warmup"]:
            times["moe"].append(moe_s)
            times["dense"].append(dense_s)
            stats.append(moe_stats)
    return summarize(cfg, gate_outputs(spec), times, stats, peak)


def summarize(
    cfg: dict, num_gate_outputs: int, times: dict, stats: list, peak: float | None
) -> dict:
    """MEASURED from the timed steps' seconds and routing stats, and the process's peak memory.

    peak is the device's peak FLOP/s (telemetry.resolve_peak_flops; None where unknown): mfu is
    telemetry.mfu of the MoE's achieved rate, as training computes it, NaN without a peak.

    Routing stats are means over the timed steps: cv_load is the CV of the load the loss used (the
    smooth estimate of Eq. 10 / 14 in training), cv_tokens_per_expert that of the true counts.
    """
    tokens, k, d, h = cfg["tokens"], cfg["k"], cfg["d_model"], cfg["d_hidden"]
    moe_med, moe_min = statistics.median(times["moe"]), min(times["moe"])
    dense_med, dense_min = statistics.median(times["dense"]), min(times["dense"])
    moe_gflops = train_flops(tokens, d, h, k, num_gate_outputs) / moe_med / 1e9
    counts_E = torch.stack([s.tokens_per_expert for s in stats]).float()
    active = (counts_E > 0).sum(1).float()
    if cfg["device"] == "cuda":
        peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    values = [
        *(1e3 * t for t in (moe_med, moe_min, dense_med, dense_min)),
        *(1e6 * t / tokens for t in (moe_med, dense_med)),
        moe_med / dense_med,
        moe_min / dense_min,
        moe_gflops,
        train_flops(tokens, d, h, k, 0) / dense_med / 1e9,
        math.nan if peak is None else peak / 1e9,
        telemetry.mfu(moe_gflops / 1e3, peak),
        peak_mem_mb,
        active.mean().item(),
        (tokens * k / active).mean().item(),
        statistics.mean(s.cv_load.item() for s in stats),
        statistics.mean(balancing.cv_squared(c).sqrt().item() for c in counts_E),
        statistics.mean(s.max_over_mean_load.item() for s in stats),
    ]
    return dict(zip(MEASURED, values, strict=True))


def run_worker(cfg_path: str, result_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        result = {"status": "ok", **measure(cfg)}
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        oom = ("out of memory", "can't allocate memory")
        if isinstance(err, RuntimeError) and not any(s in str(err).lower() for s in oom):
            raise
        result = {"status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0]}"}
    Path(result_path).write_text(json.dumps(result))
    return 0
