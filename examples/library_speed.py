"""The layer's speed as a library user gets it: a plain `import moe_impl`, no allocator setting, no
CLI, one process; each configuration's MoE and its FLOP-matched dense FFN timed alternately.

    python examples/library_speed.py                       # 4,32,256-h,1024-h,4096-h at 4096 tokens
    python examples/library_speed.py --experts 4,16-h --tokens 256 --threads 2
    python examples/library_speed.py --compile             # routing and combine compiled

Compare with `python -m moe_impl bench --experts ... --tokens ... --threads 1`, which runs each
configuration in a fresh child process (docs/performance.md, "The layer as a library").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moe_impl import HierarchicalMoE, MoE


def build(entry: str, d: int, h: int) -> tuple[MoE | HierarchicalMoE, int]:
    """`N` (flat, k = 4) or `N-h` (hierarchical a x b, a = 2**floor(log2(N) / 2), k = 2 + 2)."""
    if entry.endswith("-h"):
        n = int(entry[:-2])
        a = 2 ** ((n.bit_length() - 1) // 2)
        return HierarchicalMoE(d, h, a, n // a), 4
    return MoE(d, h, int(entry), k=4), 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="4,32,256-h,1024-h,4096-h")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--compile",
        action="store_true",
        help="layer.compile_routing(): gates and combine through torch.compile (the first "
        "warm-up steps compile)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d, h = 64, 128
    routing = "compiled" if args.compile else "eager"
    print(f"tokens={args.tokens} threads={args.threads} d_model={d} d_hidden={h} routing={routing}")
    print(f"{'experts':>8} {'MoE ms':>8} {'dense ms':>9} {'us/token':>9} {'ratio':>6}")
    for entry in args.experts.split(","):
        torch.manual_seed(0)
        moe, k = build(entry, d, h)
        if args.compile:
            moe.compile_routing()
        dense = nn.Sequential(
            nn.Linear(d, k * h, bias=False), nn.ReLU(), nn.Linear(k * h, d, bias=False)
        )
        x = torch.randn(args.tokens, d, requires_grad=True)
        times = {"moe": [], "dense": []}
        for i in range(args.warmup + args.reps):
            for name, model in (("moe", moe), ("dense", dense)):
                model.zero_grad(set_to_none=True)
                x.grad = None
                start = time.perf_counter()
                if name == "moe":
                    out = moe(x)
                    loss = out.y.square().mean() + out.aux_loss
                else:
                    loss = dense(x).square().mean()
                loss.backward()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        moe_s, dense_s = statistics.median(times["moe"]), statistics.median(times["dense"])
        print(
            f"{entry:>8} {1e3 * moe_s:8.1f} {1e3 * dense_s:9.1f} "
            f"{1e6 * moe_s / args.tokens:9.2f} {moe_s / dense_s:6.2f}"
        )


if __name__ == "__main__":
    main()
