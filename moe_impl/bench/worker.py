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
from torch import Tensor, nn

from moe_impl import runtime, telemetry
from moe_impl.bench import peers
from moe_impl.bench.spec import ExpertSpec, gate_outputs, train_flops
from moe_impl.layer import balancing
from moe_impl.layer.base import MoELayer
from moe_impl.layer.grouped import expert_kernel

EXIT_TOO_SLOW = 86  # a child's exit code when its first step exceeds --max-seconds-per-step
# with --compile the first steps also compile the routing (inductor's C++ or Triton build): the
# watchdog allows this many seconds more
COMPILE_ALLOWANCE_S = 600.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEASURED = (  # noqa: SIM905 (what the child process reports; NaN in a skipped row)
    "moe_ms_median moe_ms_min dense_ms_median dense_ms_min moe_us_per_token dense_us_per_token "
    "ratio_median ratio_min moe_gflops dense_gflops peak_gflops mfu peak_mem_mb "
    "active_experts tokens_per_active_expert cv_load cv_tokens_per_expert max_over_mean_load"
).split()


def measure(cfg: dict) -> dict:
    """Child process: build the layer (ours or a peer, peers.build) and its dense FFN, alternate
    timed layer and dense steps, return MEASURED."""
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    if device.type == "cpu":
        runtime.flush_denormals()  # as training does (moe_impl/runtime.py)
    # the peak training's MFU uses (summary.json): the datasheet table on GPUs, a GEMM measured
    # here, at the configuration's thread count, on CPUs; None where the device is unknown
    peak, _ = telemetry.resolve_peak_flops(cfg["device"], cfg["dtype"])
    spec = ExpertSpec(*(cfg[key] for key in ExpertSpec._fields))
    d, h, tokens = cfg["d_model"], cfg["d_hidden"], cfg["tokens"]
    built = peers.build(cfg.get("implementation", peers.OURS), spec, d, h, cfg["k"])
    moe = built.module.to(device).train()
    compiled = bool(cfg.get("compile")) and isinstance(moe, MoELayer)  # ours, not a peer
    if compiled and isinstance(moe, MoELayer):
        moe.compile_routing()  # torch.compile's defaults (inductor), fullgraph
    k = built.k
    dense = peers.relu_expert(d, k * h).to(device).train()  # k experts' FLOPs in one FFN
    x_BD = torch.randn(tokens, d, device=device, requires_grad=True)
    # NOTE: plain SGD accepts the sparse expert gradients (>= 4096 experts) and keeps no state.
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3) for m in (moe, dense) if cfg["optimizer"]}

    def dense_forward(x: Tensor) -> tuple[Tensor, Tensor, None]:
        return dense(x), x.new_zeros(()), None

    def step(model: nn.Module, forward) -> tuple[float, object]:
        model.zero_grad(set_to_none=True)
        x_BD.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, aux, stats = forward(x_BD)
        (y.float().square().mean() + aux).backward()
        if model in opts:
            opts[model].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, stats

    # The first MoE step estimates the step time: a watchdog ends the child if it runs too long.
    limit = cfg["max_seconds"] + (COMPILE_ALLOWANCE_S if compiled else 0.0)
    watchdog = threading.Timer(limit, os._exit, args=(EXIT_TOO_SLOW,))
    watchdog.daemon = True
    watchdog.start()
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    warmup_s, stats = [], []
    kernel = cfg.get("kernel") or "auto"  # ours only ("" for a peer)

    def moe_forward(x: Tensor) -> tuple:
        with expert_kernel(kernel):  # the layers choose their kernel in the forward
            return built.forward(x)

    for i in range(cfg["warmup"] + cfg["reps"]):
        moe_s, moe_stats = step(moe, moe_forward)
        watchdog.cancel()
        dense_s, _ = step(dense, dense_forward)
        if i >= cfg["warmup"]:
            times["moe"].append(moe_s)
            times["dense"].append(dense_s)
            stats.append(moe_stats)
        else:
            warmup_s.append(moe_s)
    params = sum(p.numel() for p in moe.parameters())
    row = summarize({**cfg, "k": k}, gate_outputs(spec), times, stats, peak)
    compile_s = compile_seconds(warmup_s, times["moe"]) if compiled else math.nan
    return {**row, "params": params, "compile_s": compile_s}


def compile_seconds(warmup_s: list[float], timed_s: list[float]) -> float:
    """The compile time of the routing: what the warm-up steps took beyond the timed steps'
    median (the first step compiles; a second may recompile with dynamic shapes, as the buffer's
    rows change with the routing); NaN without warm-up steps."""
    if not warmup_s:
        return math.nan
    median = statistics.median(timed_s)
    return sum(max(0.0, s - median) for s in warmup_s)


def summarize(
    cfg: dict, num_gate_outputs: int, times: dict, stats: list, peak: float | None
) -> dict:
    """MEASURED from the timed steps' seconds and routing stats, and the process's peak memory.

    peak is the device's peak FLOP/s (telemetry.resolve_peak_flops; None where unknown): mfu is
    telemetry.mfu of the MoE's achieved rate, as training computes it, NaN without a peak.

    Routing stats are means over the timed steps: cv_load is the CV of the load the loss used (the
    smooth estimate of Eq. 10 / 14 in training), cv_tokens_per_expert that of the true counts; NaN
    for a peer (its stats are None). FLOPs are the analytic ones of our configuration at the
    layer's k (spec.train_flops), so a peer's GFLOP/s counts the same useful work.
    """
    tokens, k, d, h = cfg["tokens"], cfg["k"], cfg["d_model"], cfg["d_hidden"]
    moe_med, moe_min = statistics.median(times["moe"]), min(times["moe"])
    dense_med, dense_min = statistics.median(times["dense"]), min(times["dense"])
    moe_gflops = train_flops(tokens, d, h, k, num_gate_outputs) / moe_med / 1e9
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
        *routing_values(stats, tokens * k),
    ]
    return dict(zip(MEASURED, values, strict=True))


def routing_values(stats: list, slots: int) -> list[float]:
    """Active experts, slots per active expert, CV of the load, CV of the counts, max/mean load:
    means over the timed steps' RoutingStats, NaN where the layer reports none (a peer)."""
    if any(s is None for s in stats):
        return [math.nan] * 5
    counts_E = torch.stack([s.tokens_per_expert for s in stats]).float()
    active = (counts_E > 0).sum(1).float()
    return [
        active.mean().item(),
        (slots / active).mean().item(),
        statistics.mean(s.cv_load.item() for s in stats),
        statistics.mean(balancing.cv_squared(c).sqrt().item() for c in counts_E),
        statistics.mean(s.max_over_mean_load.item() for s in stats),
    ]


def run_worker(cfg_path: str, result_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        result = {"status": "ok", **measure(cfg)}
    except ImportError as err:  # a peer installed without what its layer imports (peers.py)
        result = {"status": "skipped", "reason": f"cannot import: {err}"}
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        oom = ("out of memory", "can't allocate memory")
        if isinstance(err, RuntimeError) and not any(s in str(err).lower() for s in oom):
            raise
        result = {"status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0]}"}
    Path(result_path).write_text(json.dumps(result))
    return 0
