"""`python -m moe_impl bench`: one MoE layer's training step against a FLOP-matched dense FFN.

The protocol of the peers' CPU measurements (docs/performance.md): forward + backward in training mode, grads set to None between
steps, the MoE and the dense FFN `Linear(d, k·h) -> ReLU -> Linear(k·h, d)` (no biases, the same
active FLOPs) timed alternately in one process so that their ratio holds under load, and one child
process per configuration so that peak memory is per configuration. Sweeps flat and hierarchical
(App. B) layers at fixed tokens per step or at fixed tokens per expert (the paper's regime).
A configuration whose estimated peak memory (moe_impl/bench/memory.py) exceeds the memory available
is skipped before it is built; exit code EXIT_NONE_MEASURED when no configuration was measured.
Not here: the measuring child (moe_impl/bench/worker.py), the text table and figure (moe_impl/bench/plot.py), and
timing targets (never asserted in tests).

`bench --data` (run_data, at the end) is another mode: the synthetic corpus's training batches as
the trainer makes them (`trainer_batches`) against the reference generator, with a check that
they are identical (moe_impl/bench/data_input.py; docs/performance.md, "Training input").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from moe_impl import runtime
from moe_impl.bench import data_input
from moe_impl.bench import plot as bench_plot
from moe_impl.bench.memory import estimate_peak_bytes
from moe_impl.bench.peers import OURS, PEERS, build_moe, k_of, parse_peers, unavailable
from moe_impl.bench.spec import (
    PEERS_MAX_EXPERTS,
    ExpertSpec,
    gate_outputs,
    parse_experts,
    train_flops,
)
from moe_impl.bench.worker import DTYPES, EXIT_TOO_SLOW, MEASURED, run_worker
from moe_impl.data import synthetic_reference
from moe_impl.data.base import Batch
from moe_impl.layer.flat import wide_refusal
from moe_impl.layer.grouped import KERNELS
from moe_impl.train.config import load_config
from moe_impl.train.corpus import build_corpus
from moe_impl.train.prefetch import TrainBatches, resolve_workers

DEFAULT_EXPERTS = "4,32,256,256-h,1024-h,4096-h,16384-h,65536-h,131072-h"
EXIT_SOME_FAILED = 1  # a configuration crashed (the others were measured)
EXIT_NONE_MEASURED = 3  # every configuration was skipped or failed: nothing to report
EXIT_CODES = (
    "exit codes: 0 every configuration measured or skipped with a reason (at least one measured); "
    f"{EXIT_SOME_FAILED} some configuration failed; 2 bad arguments; {EXIT_NONE_MEASURED} every "
    "configuration was skipped or failed"
)


def available_bytes(device: str) -> int | None:
    """Memory a configuration may take now: the GPU's free memory for "cuda", else the host's
    MemAvailable (/proc/meminfo: free plus reclaimable, not the total); None where unknown."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(size_bytes: float) -> str:
    return f"{size_bytes / 2**30:.1f} GB"


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
    flags = ("d_model", "d_hidden", "k", "tokens", "reps", "threads", "max_tokens")
    for flag in (*flags, "peers_max_experts"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    runtime.check_threads("--threads", args.threads)  # no more than the CPUs it may run on
    rss = args.max_rss_gb
    if args.warmup < 0 or not args.max_seconds_per_step > 0 or (rss is not None and not rss > 0):
        raise ValueError("--warmup must be >= 0; --max-seconds-per-step, --max-rss-gb > 0")
    if getattr(args, "compile", False) and args.warmup < 1:
        raise ValueError("--compile needs --warmup >= 1 (the warm-up steps compile)")
    if args.tokens_per_expert is not None and not args.tokens_per_expert > 0:
        raise ValueError(f"--tokens-per-expert must be > 0, got {args.tokens_per_expert}")
    if args.tokens_per_expert is None and args.max_tokens is not None:
        raise ValueError("--max-tokens applies only with --tokens-per-expert")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")


def make_row(spec: ExpertSpec, args: argparse.Namespace, implementation: str = OURS) -> dict:
    """One row with every key, measurements NaN; it is also the child process's config. A peer's
    row (moe_impl/bench/peers.py) has its k and configuration; its memory is not estimated."""
    k = k_of(spec, args.k)
    if k > spec.num_experts:
        raise ValueError(f"--k={k} must be <= the experts of --experts entry {spec.config!r}")
    ours = implementation == OURS
    kernel = getattr(args, "kernel", "auto")
    why = None
    if ours and kernel == "wide":
        why = wide_refusal(spec.layer_config(args.d_model, args.d_hidden, k))
    if why is not None:
        raise ValueError(
            "--kernel wide runs flat entries with k = n and dense expert gradients only; "
            f"--experts entry {spec.config!r} {why}"
        )
    peer = None if ours else PEERS[implementation]
    if peer is not None:
        k = peer.k(spec, args.k)
    d, h, m, tokens = args.d_model, args.d_hidden, args.tokens_per_expert, args.tokens or 4096
    if m is not None:
        tokens = min(math.ceil(m * spec.num_experts / k), args.max_tokens or 131072)
    return {
        "implementation": implementation,
        **spec._asdict(),
        "kind": "hierarchical" if spec.hierarchical else "flat",
        "peer_config": "" if peer is None else peer.describe(spec, args.k),  # None: ours
        "d_model": d,
        "d_hidden": h,
        "k": k,
        "params": count_params(spec, d, h, k) if ours else math.nan,  # a peer's: its child's
        "tokens": tokens,
        "tokens_mode": "fixed_tokens" if m is None else "fixed_tokens_per_expert",
        "target_tokens_per_expert": m,
        "max_tokens": None if m is None else args.max_tokens or 131072,
        "tokens_per_expert": tokens * k / spec.num_experts,
        "est_mem_mb": estimate_peak_bytes(spec, d, h, k, tokens) / 2**20 if ours else math.nan,
        "compile": bool(getattr(args, "compile", False))
        and ours,  # routing and combine compiled (--compile)
        "compile_s": math.nan,
        "kernel": kernel if ours else "",
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
    p = subparsers.add_parser(
        "bench",
        help="time MoE layers against a FLOP-matched dense FFN",
        description="Time MoE layers against a FLOP-matched dense FFN, one child process per "
        "configuration. A configuration whose estimated peak memory exceeds the memory available "
        "(MemAvailable; the GPU's free memory with --device cuda) is skipped before it is built.",
        epilog=EXIT_CODES,
    )
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
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads, at most the CPUs this process may run on (default: "
        "torch.get_num_threads())",
    )
    add_step_arguments(p)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default mmap threshold (see moe_impl/runtime.py; default: raise it)",
    )
    p.add_argument("--max-seconds-per-step", type=float, default=60.0, help="skip slower configs")
    p.add_argument(
        "--max-rss-gb",
        type=float,
        help="kill a child whose resident memory exceeds this (default: the memory available "
        "when it starts, MemAvailable)",
    )
    p.add_argument(
        "--peers",
        nargs="?",
        const="all",
        metavar="NAMES",
        help="also time the peers' MoE layers that are installed, each beside its own dense FFN: "
        f"all (the default with no value) or some of {', '.join(PEERS)} (moe_impl/bench/peers.py)",
    )
    p.add_argument(
        "--peers-max-experts",
        type=int,
        default=PEERS_MAX_EXPERTS,
        help="skip peers above this many experts (their dense routing tensors grow with tokens x "
        f"experts; default {PEERS_MAX_EXPERTS})",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write bench.json, bench.csv and bench.png here (with --data: data_bench.json)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: one child config
    add_distributed_arguments(p)
    add_data_arguments(p)


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """How each timed step runs: optimizer, device, dtype, seed, compiled routing, expert kernel."""
    p.add_argument(
        "--optimizer",
        action="store_true",
        help="include torch.optim.SGD(lr=1e-3) in each step (it accepts sparse expert gradients)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="bf16 = autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="run our layer's routing and combine through torch.compile (MoELayer."
        "compile_routing; the expert matmuls, the dispatch and the dense FFN stay eager); the "
        "compile time is reported (what the warm-up steps took beyond the median), so --warmup "
        "must be >= 1",
    )
    p.add_argument(
        "--kernel",
        choices=KERNELS,
        default="auto",
        help="our layer's expert kernel (moe_impl/layer/grouped.py expert_kernel): auto (default), "
        "blocked, grouped, or wide (flat entries with k = n only: one FFN of width n·h, "
        "moe_impl/layer/wide.py)",
    )


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """--distributed and its options."""
    dist = p.add_argument_group("expert parallelism (moe_impl/bench/distributed.py)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="time the expert-parallel layer over several ranks: tokens per expert, bytes sent, "
        "communication vs. compute per rank (--tokens per rank); under torchrun, one rank each",
    )
    dist.add_argument("--world-size", type=int, default=2, help="local processes to spawn")
    dist.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    dist.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data (the training input's speed) and its options."""
    data = p.add_argument_group(
        "training input (--data; moe_impl/bench/data_input.py)",
        "time the synthetic corpus's training batches, the trainer's path against the reference "
        "generator, and check that they are identical; writes DIR/data_bench.json with --out",
    )
    data.add_argument(
        "--data",
        action="store_true",
        help="time the training input instead of the layer (only --out, --config, --set and "
        "--steps apply; exit code 1 when a batch differs from the reference's)",
    )
    data.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="training config (repeatable, as in `train`; default: config/train/gpu.yaml, the "
        "gpu/ presets' 4096 x 64 batch); its data and train.batch_size / train.seq_len are used",
    )
    data.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="data_overrides",
        help="override one key of it, as in `train` (e.g. --set train.batch_size=256)",
    )
    data.add_argument("--steps", type=int, help="timed batches per path (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(*args.worker)
    if getattr(args, "kernel", "auto") != "auto" and (args.data or args.distributed):
        raise ValueError(
            "--kernel applies to the single-process layer benchmark, not --data or "
            f"--distributed; got --kernel {args.kernel}"
        )
    if args.data:
        return run_data(args)
    if args.config or args.data_overrides or args.steps is not None:
        raise ValueError("--config, --set and --steps apply only with --data")
    specs = parse_experts(args.experts)
    if args.distributed:
        from moe_impl.bench import distributed as bench_dist

        return bench_dist.run(args, specs)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(args)
    if args.k != 4 and any(s.hierarchical for s in specs):
        print("warning: --k applies to flat entries; hierarchical ones use k=2+2", file=sys.stderr)
    names = parse_peers(args.peers)
    missing = {name: why for name in names if (why := unavailable(name, args.device))}
    impls = [OURS, *(name for name in names if name not in missing)]
    # validates every entry before running; per configuration, ours then each peer
    rows = [make_row(spec, args, impl) for spec in specs for impl in impls]
    for i, row in enumerate(rows, 1):
        label = f"{row['config']} {row['implementation']}"
        print(f"[{i}/{len(rows)}] {label} T={row['tokens']} ...", file=sys.stderr)
        row["load_avg"] = os.getloadavg()[0]
        if reason := too_large(row, args.device, args.peers_max_experts):
            row.update(status="skipped", reason=reason)
            continue
        row.update(run_child({**row, "max_seconds": args.max_seconds_per_step}, rss_limit(args)))
    print(bench_plot.format_table(rows))
    for name, why in missing.items():
        print(f"peer {name}: {why}")
    paths = {"json": args.json, "csv": args.csv, "png": args.png}
    if args.out is not None:
        paths = {ext: p or args.out / f"bench.{ext}" for ext, p in paths.items()}
    bench_plot.write_outputs(rows, **{f"{ext}_path": p for ext, p in paths.items()})
    if not any(r["status"] == "ok" for r in rows):
        print(
            "error: no configuration was measured (each was skipped or failed: the reasons "
            f"are above); exit code {EXIT_NONE_MEASURED}",
            file=sys.stderr,
        )
        return EXIT_NONE_MEASURED
    return EXIT_SOME_FAILED if any(r["status"] == "failed" for r in rows) else 0


def too_large(row: dict, device: str, peers_max_experts: int | None = None) -> str | None:
    """Why `row` cannot run here, or None: a peer above --peers-max-experts, or our estimated peak
    (moe_impl/bench/memory.py) against the memory available now, on the device that holds its
    tensors (a peer's is not estimated: its child is stopped at the RSS limit instead)."""
    if row["implementation"] != OURS:
        limit = peers_max_experts
        if limit is not None and row["num_experts"] > limit:
            return f"peer above --peers-max-experts={limit}"
        return None
    free = available_bytes(device)
    need = row["est_mem_mb"] * 2**20
    if free is None or need <= free:
        return None
    where = "free on the GPU" if device == "cuda" else "available"
    return f"out of memory: estimated {_gb(need)} for this configuration, {_gb(free)} {where}"


def rss_limit(args: argparse.Namespace) -> float:
    """The child's resident-memory limit in GB: --max-rss-gb, else the host's available memory
    now (else 0.8 x its total where that is unknown)."""
    if args.max_rss_gb is not None:
        return args.max_rss_gb
    free: float | None = available_bytes("cpu")
    if free is None:
        free = 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return free / 2**30


# --- bench --data: the training input --------------------------------------------------------------

DATA_CONFIG = Path(__file__).resolve().parents[2] / "config" / "train" / "gpu.yaml"
DATA_STEPS = 5


def trainer_batches(
    corpus, batch_size: int, seq_len: int, steps: range, workers: int = 0
) -> Iterator[Batch]:
    """The batches the trainer consumes for `steps`, in order, made the way it makes them: inline
    (`corpus.train_batch` step by step) or by its producer's `workers` processes working ahead
    (moe_impl/train/prefetch.py); `bench --data` times it as the loop sees it (the wait for each
    next batch) and checks its batches against the reference."""
    with TrainBatches(corpus, batch_size, seq_len, workers=workers) as batches:
        batches.start(steps.start, steps.stop)
        for step in steps:
            yield batches.get(step)


def reference_batches(corpus, batch_size: int, seq_len: int, steps: range) -> Iterator[Batch]:
    """The same steps from the generator every run trained on before issue 28."""
    for step in steps:
        yield synthetic_reference.train_batch(corpus, step, batch_size, seq_len)


def run_data(args: argparse.Namespace) -> int:
    """`bench --data`: exit 0 when every batch is identical, 1 when one is not."""
    steps = DATA_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    files = args.config or [DATA_CONFIG]
    cfg = load_config(files, args.data_overrides)
    if cfg.data.corpus != "synthetic":
        raise ValueError(
            f"bench --data times the synthetic corpus against its reference generator; "
            f"data.corpus={cfg.data.corpus!r}"
        )
    start = time.perf_counter()
    corpus = build_corpus(cfg)  # the successor table, from the cache when it is there: not timed
    corpus_seconds = time.perf_counter() - start
    batch, seq_len = cfg.train.batch_size, cfg.train.seq_len
    print(
        f"training input: {' '.join(map(str, [*files, *args.data_overrides]))}: "
        f"{batch} x {seq_len} = {batch * seq_len:,} positions per batch, {steps} steps "
        f"(corpus ready in {corpus_seconds:.1f} s, not timed)",
        file=sys.stderr,
    )
    load_before = os.getloadavg()[0]
    # the trainer's producer as this config runs it (train.prefetch_workers, resolved for its
    # device; --set train.prefetch_workers=N picks another count)
    workers = resolve_workers(
        cfg.train.prefetch_workers, corpus.name, cfg.train.device.split(":")[0]
    )
    print(f"trainer's path: {workers or 'no'} producer processes", file=sys.stderr)
    result = data_input.compare(
        lambda s: trainer_batches(corpus, batch, seq_len, s, workers),
        lambda s: reference_batches(corpus, batch, seq_len, s),
        range(steps),
        batch * seq_len,
    )
    record = {
        "config": [str(f) for f in files],
        "overrides": list(args.data_overrides),
        "corpus": corpus.describe(),
        "batch_size": batch,
        "seq_len": seq_len,
        "tokens_per_batch": batch * seq_len,
        "prefetch_workers": workers,
        "steps": steps,
        "corpus_seconds": corpus_seconds,
        **result,
        "load_avg": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(data_input.format_table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    if not result["identical"]:
        print("error: the trainer's batches differ from the reference's", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
