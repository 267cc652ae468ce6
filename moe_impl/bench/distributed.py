"""`python -m moe_impl bench --distributed`: the expert-parallel layer's training step, per rank.

Each configuration builds DistributedMoE / DistributedHierarchicalMoE over W ranks (each rank
`--tokens` tokens of its own, so the global batch is W times larger: the paper's answer to the
shrinking batch, §3.1) and times forward + backward + the all_reduce of the replicated (gate)
gradients. Per rank it reports the tokens its experts received, the bytes it sent to other ranks
(all_to_all, forward and backward) and all-reduced, and how the step's time splits between the
collectives (moe_impl.parallel.meter, device-synchronised) and everything else (compute).

Under torchrun (even with one process) this process is one rank; otherwise it spawns `--world-size` local
processes (gloo on CPU; nccl when --device cuda, one GPU each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from moe_impl import runtime
from moe_impl.bench import plot as bench_plot
from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, ExpertSpec, gate_outputs, train_flops

COLUMNS = (  # (header, key, format) of the printed table; one line per (configuration, rank)
    ("config", "config", "{}"),
    ("rank", "rank", "{:d}"),
    ("tokens", "tokens", "{:d}"),
    ("experts", "local_experts", "{:d}"),
    ("tok/expert", "tokens_per_local_expert", "{:.1f}"),
    ("slots in", "slots_received", "{:d}"),
    ("MB sent", "mb_sent", "{:.2f}"),
    ("MB reduced", "mb_reduced", "{:.3f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("comm ms", "comm_ms", "{:.1f}"),
    ("compute ms", "compute_ms", "{:.1f}"),
    ("comm %", "comm_fraction", "{:.0%}"),
)


def build(spec: ExpertSpec, d_model: int, d_hidden: int, k: int):
    from moe_impl.parallel import DistributedHierarchicalMoE, DistributedMoE

    cls = DistributedHierarchicalMoE if spec.hierarchical else DistributedMoE
    return cls(spec.layer_config(d_model, d_hidden, k))


def measure_rank(rank: int, world: int, cfg: dict) -> list[dict]:
    """Every configuration on this rank: one row each (medians over the timed steps)."""
    from moe_impl.parallel import meter, sum_replicated_grads

    local_rank = int(os.environ.get("LOCAL_RANK", rank))  # torchrun on several nodes, or spawned
    device = torch.device(cfg["device"], local_rank) if cfg["device"] == "cuda" else "cpu"
    device = torch.device(device)
    dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else None
    rows = []
    for entry in cfg["specs"]:
        spec = ExpertSpec(*entry)
        k = K_PRIMARY * K_SECONDARY if spec.hierarchical else cfg["k"]
        torch.manual_seed(cfg["seed"])
        layer = build(spec, cfg["d_model"], cfg["d_hidden"], k).to(device).train()
        g = torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + rank)
        # the input needs a gradient, as the LSTM output it stands for does (the backward then
        # sends every row back, as in training)
        x = torch.randn(cfg["tokens"], cfg["d_model"], generator=g, device=device)
        x.requires_grad_(True)
        steps = []
        for i in range(cfg["warmup"] + cfg["reps"]):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with meter() as m:
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                    out = layer(x, generator=g)
                (out.y.float().square().mean() + out.aux_loss).backward()
                sum_replicated_grads(layer)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            if i >= cfg["warmup"]:
                counts = out.stats.tokens_per_expert
                first = layer.experts.first_expert
                local = counts[first : first + layer.experts.w_in.shape[0]]
                steps.append((seconds, m, int(local.sum()), local.numel()))
        step_s = statistics.median(s for s, *_ in steps)
        comm_s = statistics.median(m.seconds for _, m, *_ in steps)
        rows_in, num_local = steps[-1][2], steps[-1][3]
        rows.append(
            {
                "config": spec.config,
                "kind": "hierarchical" if spec.hierarchical else "flat",
                "num_experts": spec.num_experts,
                "rank": rank,
                "world_size": world,
                "backend": dist.get_backend(),
                "device": str(device),
                "tokens": cfg["tokens"],
                "global_tokens": cfg["tokens"] * world,
                "local_experts": num_local,
                "slots_received": rows_in,  # (token, expert) slots its experts ran
                "tokens_per_local_expert": rows_in / num_local if num_local else math.nan,
                "mb_sent": steps[-1][1].bytes_sent / 1e6,
                "mb_received": steps[-1][1].bytes_received / 1e6,
                "mb_reduced": steps[-1][1].bytes_reduced / 1e6,
                "collectives": steps[-1][1].calls,
                "step_ms": 1e3 * step_s,
                "comm_ms": 1e3 * comm_s,
                "compute_ms": 1e3 * (step_s - comm_s),
                "comm_fraction": comm_s / step_s,
                "comm_ms_by_kind": {
                    kind: 1e3 * statistics.median(m.by_kind.get(kind, 0.0) for _, m, *_ in steps)
                    for kind in steps[-1][1].by_kind
                },
                "train_gflop_per_rank": train_flops(
                    cfg["tokens"], cfg["d_model"], cfg["d_hidden"], k, gate_outputs(spec)
                )
                / 1e9,
                "threads": torch.get_num_threads(),
                "reps": cfg["reps"],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    return "\n".join(bench_plot.aligned_lines(COLUMNS, rows))


def check(
    args: argparse.Namespace, world: int, specs: list[ExpertSpec], *, under_torchrun: bool = False
) -> None:
    """Arguments a user can get wrong; torchrun may start one process (a check of the collectives'
    backend, e.g. NCCL on one GPU), a spawned run needs two."""
    if world < 2 and not under_torchrun:
        raise ValueError(f"--world-size must be >= 2, got {world}")
    for flag in ("tokens", "reps", "d_model", "d_hidden", "k", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    runtime.check_threads("--threads", args.threads)  # per process: no more than its CPUs
    for spec in specs:
        if not spec.hierarchical and args.k > spec.num_experts:
            raise ValueError(
                f"--k={args.k} must be <= the experts of --experts entry {spec.config!r}"
            )
    if args.tokens_per_expert is not None:
        raise ValueError("--tokens-per-expert does not apply with --distributed; use --tokens")
    if (
        args.device == "cuda"
        and torch.cuda.device_count() < world
        and "WORLD_SIZE" not in os.environ
    ):
        raise ValueError(
            f"--device cuda --world-size {world}: only {torch.cuda.device_count()} GPUs visible"
        )


def run(args: argparse.Namespace, specs: list[ExpertSpec]) -> int:
    """The --distributed mode of `python -m moe_impl bench` (bench.py parses the arguments)."""
    from moe_impl.parallel import spawn
    from moe_impl.parallel.launch import (
        env_world_size,
        init_from_env,
        resolve_backend,
        under_launcher,
    )

    under_torchrun = env_world_size() > 1 or under_launcher()  # torchrun, even with one process
    world = env_world_size() if under_torchrun else args.world_size
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    check(args, world, specs, under_torchrun=under_torchrun)
    cfg = {
        "specs": [tuple(s) for s in specs],
        "tokens": args.tokens or 4096,
        "d_model": args.d_model,
        "d_hidden": args.d_hidden,
        "k": args.k,
        "reps": args.reps,
        "warmup": args.warmup,
        "seed": args.seed,
        "device": device,
        "dtype": args.dtype,
    }
    if under_torchrun:
        info = init_from_env(args.backend, device)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        mine = measure_rank(info.rank, world, cfg)
        gathered: list[Any] = [None] * world  # each rank's rows, filled in by all_gather_object
        dist.all_gather_object(gathered, mine)
        dist.destroy_process_group()
        if info.rank != 0:
            return 0
    else:
        backend = resolve_backend(args.backend, device)
        threads = args.threads or max(1, runtime.usable_cpus() // world)  # share its CPUs
        print(f"spawning {world} {backend} processes, {threads} threads each", file=sys.stderr)
        gathered = spawn(
            measure_rank, world, (cfg,), backend=backend, threads=threads, timeout_s=args.timeout
        )
    rows = sorted((r for rank_rows in gathered for r in rank_rows), key=lambda r: r["rank"])
    rows.sort(key=lambda r: [s.config for s in specs].index(r["config"]))
    print(format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_distributed.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out / 'bench_distributed.json'}", file=sys.stderr)
    return 0
