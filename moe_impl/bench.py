"""`python -m moe_impl bench`: one MoE layer's training step against a FLOP-matched dense FFN.

The protocol of peers.md Part 2: forward + backward in training mode, grads set to None between
steps, the MoE and the dense FFN `Linear(d, k·h) -> ReLU -> Linear(k·h, d)` (no biases, the same
active FLOPs) timed alternately in one process so that their ratio holds under load, and one child
process per configuration so that peak memory is per configuration. Sweeps flat and hierarchical
(App. B) layers at fixed tokens per step or at fixed tokens per expert (the paper's regime).
Not here: the text table and figure (bench_plot.py); timing targets (never asserted in tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from moe_impl import HierarchicalMoE, MoE, balancing, bench_plot

DEFAULT_EXPERTS = "4,32,256,256-h,1024-h,4096-h,16384-h,65536-h,131072-h"
K_PRIMARY = K_SECONDARY = 2  # every hierarchical model of the paper uses 2 + 2
EXIT_TOO_SLOW = 86  # a child's exit code when its first step exceeds --max-seconds-per-step
# Dense peaks from the vendors' datasheets, TFLOP/s: (bf16, float32 without TF32). First match wins.
CUDA_PEAK_TFLOPS = {
    "H100 PCIe": (756, 51),
    "H100": (989, 67),
    "H200": (989, 67),
    "A100": (312, 19.5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEASURED = (  # noqa: SIM905 (what the child process reports; NaN in a skipped row)
    "moe_ms_median moe_ms_min dense_ms_median dense_ms_min moe_us_per_token dense_us_per_token "
    "ratio_median ratio_min moe_gflops dense_gflops peak_gflops mfu peak_mem_mb "
    "active_experts tokens_per_active_expert cv_load cv_tokens_per_expert max_over_mean_load"
).split()


class ExpertSpec(NamedTuple):
    """One `--experts` entry: flat (num_groups = group_size = None) or hierarchical a x b."""

    config: str  # the entry as written, e.g. "256-h"
    num_experts: int
    num_groups: int | None = None
    group_size: int | None = None

    @property
    def hierarchical(self) -> bool:
        return self.num_groups is not None


def parse_experts(text: str) -> list[ExpertSpec]:
    """'4,256-h,16x64-h' -> specs. `N-h` is a x b with a = 2**floor(log2(N)/2), b = N/a."""
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        if m := re.fullmatch(r"([1-9]\d*)", entry):
            specs.append(ExpertSpec(entry, int(m[1])))
            continue
        if m := re.fullmatch(r"([1-9]\d*)-h", entry):
            n = int(m[1])
            a = 2 ** ((n.bit_length() - 1) // 2)  # floor(log2 n) // 2 == floor(log2(n) / 2)
            b = n // a
        elif m := re.fullmatch(r"([1-9]\d*)x([1-9]\d*)-h", entry):
            a, b = int(m[1]), int(m[2])
            n = a * b
        else:
            raise ValueError(
                f"--experts: bad entry {entry!r}; expected N (flat), N-h or AxB-h (hierarchical)"
            )
        if a * b != n or a < K_PRIMARY or b < K_SECONDARY:
            raise ValueError(
                f"--experts: bad entry {entry!r}; hierarchical needs N = a x b with a >= "
                f"{K_PRIMARY} groups of b >= {K_SECONDARY} experts, got a={a}, b={n / a:g}"
            )
        specs.append(ExpertSpec(entry, n, a, b))
    return specs


def train_flops(tokens: int, d_model: int, d_hidden: int, k: int, num_gate_outputs: int) -> int:
    """Analytic FLOPs of one MoE training step (forward + backward), as achieved GFLOP/s counts them.

        experts: 3 · 2 · tokens · k · 2·d·h        gate: 3 · 2 · tokens · 2·d·num_gate_outputs

    2 FLOPs per multiply-add; backward = 2x forward (grads w.r.t. inputs and weights), hence 3.
    Each active expert applies 2·d·h weights; the gate applies W_g and W_noise (2·d weights per
    output) where num_gate_outputs = n (flat) or a + k_primary·b (hierarchical: the primary gate
    plus the secondary gates of the selected groups). Elementwise work is not counted. The dense
    baseline is the expert term alone (k·h hidden units).
    """
    return 3 * 2 * tokens * (k * 2 * d_model * d_hidden + 2 * d_model * num_gate_outputs)


def gate_outputs(spec: ExpertSpec) -> int:
    if spec.hierarchical:
        return spec.num_groups + K_PRIMARY * spec.group_size
    return spec.num_experts


def build_moe(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> nn.Module:
    if spec.hierarchical:
        return HierarchicalMoE(d_model, d_hidden, spec.num_groups, spec.group_size)
    return MoE(d_model, d_hidden, spec.num_experts, k=k)


def cpu_gemm_gflops(dtype: torch.dtype, size: int = 1024, reps: int = 10) -> float:
    """Peak GFLOP/s on this CPU: the best of `reps` size^3 matmuls in `dtype` (the benchmark's),
    at the current thread count, measured in the process that runs the configuration."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cpu":
        return cpu_gemm_gflops(dtype)
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in CUDA_PEAK_TFLOPS.items():
        if key in name:
            return 1e3 * (bf16 if dtype == torch.bfloat16 else fp32)
    return math.nan


def measure(cfg: dict) -> dict:
    """Child process: build both layers, alternate timed MoE and dense steps, return MEASURED."""
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    peak = peak_gflops(device, dtype)
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


def summarize(cfg: dict, num_gate_outputs: int, times: dict, stats: list, peak: float) -> dict:
    """MEASURED from the timed steps' seconds and routing stats, and the process's peak memory.

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
        peak,
        moe_gflops / peak,
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


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (0 where /proc is unavailable)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def run_child(cfg: dict, max_rss_gb: float) -> dict:
    """Measure one configuration in a fresh process; OOM, slowness or a crash become a reason."""
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as tmp:
        cfg_path, result_path, log_path = (Path(tmp, n) for n in ("cfg.json", "out.json", "log"))
        cfg_path.write_text(json.dumps(cfg))
        malloc = [] if cfg["tune_allocator"] else ["--default-malloc"]
        cmd = [sys.executable, "-m", "moe_impl", "bench", *malloc, "--worker", str(cfg_path)]
        deadline = time.monotonic() + 300 + 2 * cfg["max_seconds"] * (cfg["warmup"] + cfg["reps"])
        reason = None
        with open(log_path, "w") as log:
            proc = subprocess.Popen([*cmd, str(result_path)], stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                if rss_bytes(proc.pid) > max_rss_gb * 2**30:
                    reason = f"out of memory: RSS above --max-rss-gb={max_rss_gb:g}"
                elif time.monotonic() > deadline:
                    reason = "timed out (the whole configuration)"
                if reason:
                    proc.kill()
                time.sleep(0.1)
        if result_path.exists():
            return json.loads(result_path.read_text())
        if reason is None and proc.returncode == EXIT_TOO_SLOW:
            reason = f"first step exceeded --max-seconds-per-step={cfg['max_seconds']:g}"
        elif reason is None and proc.returncode == -9:
            reason = "killed by SIGKILL (out of memory?)"
        if reason is not None:
            return {"status": "skipped", "reason": reason}
        tail = log_path.read_text().strip().splitlines() or ["no output"]
        return {"status": "failed", "reason": f"exit code {proc.returncode}: {tail[-1]}"}


def count_params(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in build_moe(spec, d_model, d_hidden, k).parameters())


def check_args(args: argparse.Namespace) -> None:
    for flag in ("d_model", "d_hidden", "k", "tokens", "reps", "threads", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0 or not args.max_seconds_per_step > 0 or not args.max_rss_gb > 0:
        raise ValueError("--warmup must be >= 0; --max-seconds-per-step, --max-rss-gb > 0")
    if args.tokens_per_expert is not None and not args.tokens_per_expert > 0:
        raise ValueError(f"--tokens-per-expert must be > 0, got {args.tokens_per_expert}")
    if args.tokens_per_expert is None and args.max_tokens is not None:
        raise ValueError("--max-tokens applies only with --tokens-per-expert")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")


def make_row(spec: ExpertSpec, args: argparse.Namespace) -> dict:
    """One row with every key, measurements NaN; it is also the child process's config."""
    k = K_PRIMARY * K_SECONDARY if spec.hierarchical else args.k
    if k > spec.num_experts:
        raise ValueError(f"--k={k} must be <= the experts of --experts entry {spec.config!r}")
    d, h, m, tokens = args.d_model, args.d_hidden, args.tokens_per_expert, args.tokens or 4096
    if m is not None:
        tokens = min(math.ceil(m * spec.num_experts / k), args.max_tokens or 131072)
    return {
        **spec._asdict(),
        "kind": "hierarchical" if spec.hierarchical else "flat",
        "d_model": d,
        "d_hidden": h,
        "k": k,
        "params": count_params(spec, d, h, k),
        "tokens": tokens,
        "tokens_mode": "fixed_tokens" if m is None else "fixed_tokens_per_expert",
        "target_tokens_per_expert": m,
        "max_tokens": None if m is None else args.max_tokens or 131072,
        "tokens_per_expert": tokens * k / spec.num_experts,
        "train_gflop": train_flops(tokens, d, h, k, gate_outputs(spec)) / 1e9,
        **{key: getattr(args, key) for key in ("reps", "warmup", "optimizer", "device", "dtype")},
        "threads": args.threads or torch.get_num_threads(),
        "seed": args.seed,
        "tune_allocator": not args.default_malloc,
        "load_avg": os.getloadavg()[0],
        **dict.fromkeys(MEASURED, math.nan),
        "status": "",
        "reason": "",
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time MoE layers against a FLOP-matched dense FFN")
    p.add_argument("--experts", default=DEFAULT_EXPERTS, help="N (flat), N-h or AxB-h (k=2+2)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="experts per token, flat entries (default 4)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokens", type=int, help="fixed tokens per step (default 4096)")
    tok.add_argument("--tokens-per-expert", type=float, metavar="M", help="tokens = ceil(M·n/k)")
    p.add_argument("--max-tokens", type=int, help="cap with --tokens-per-expert (default 131072)")
    p.add_argument("--reps", type=int, default=5, help="timed steps (median and min reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch.get_num_threads())")
    p.add_argument(
        "--optimizer",
        action="store_true",
        help="include torch.optim.SGD(lr=1e-3) in each step (it accepts sparse expert gradients)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="bf16 = autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default mmap threshold (see moe_impl/runtime.py; default: raise it)",
    )
    p.add_argument("--max-seconds-per-step", type=float, default=60.0, help="skip slower configs")
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    p.add_argument("--max-rss-gb", type=float, default=round(0.8 * total_gb, 1))
    p.add_argument("--out", type=Path, help="write bench.json, bench.csv and bench.png here")
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: one child config


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(*args.worker)
    specs = parse_experts(args.experts)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(args)
    if args.k != 4 and any(s.hierarchical for s in specs):
        print("warning: --k applies to flat entries; hierarchical ones use k=2+2", file=sys.stderr)
    rows = [make_row(spec, args) for spec in specs]  # validates every entry before running
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row['config']} T={row['tokens']} ...", file=sys.stderr)
        row["load_avg"] = os.getloadavg()[0]
        row.update(run_child({**row, "max_seconds": args.max_seconds_per_step}, args.max_rss_gb))
    print(bench_plot.format_table(rows))
    paths = {"json": args.json, "csv": args.csv, "png": args.png}
    if args.out is not None:
        paths = {ext: p or args.out / f"bench.{ext}" for ext, p in paths.items()}
    bench_plot.write_outputs(rows, **{f"{ext}_path": p for ext, p in paths.items()})
    return 1 if any(r["status"] == "failed" for r in rows) else 0
