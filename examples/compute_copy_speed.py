"""A layer's training step under bf16 autocast with and without the experts' compute-dtype weight
copies (moe_impl/layer/compute_copy.py; `ExpertBank.keep_compute_copies`), on one device.

    python examples/compute_copy_speed.py                      # 256,4096-h at 4096 tokens, CPU
    python examples/compute_copy_speed.py --experts 4096-h --optimizer trainer --reps 5

Two copies of the same layer (same weights, same noise) alternate steps, one keeping the copies,
one casting the weights in every forward, each going first every other step (the first of a pair
ran 5-8% slower on our CPU): forward, backward and, with `--optimizer trainer`, the
update the trainer builds (train.optim.build_optimizers: fused Adam for dense expert gradients,
FactoredAdam for sparse ones); with `--optimizer none` the weights never change (as `bench` and
gpu-check's layer_speed time a step). Their parameters stay bit for bit equal, which is checked.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from moe_impl import HierarchicalMoE, MoE
from moe_impl.train.config import TrainSection
from moe_impl.train.optim import build_optimizers


def build(entry: str, d: int, h: int) -> nn.Module:
    """`N` (flat, k = 4) or `N-h` (hierarchical a x b, a = 2**floor(log2(N) / 2), k = 2 + 2)."""
    if entry.endswith("-h"):
        n = int(entry[:-2])
        a = 2 ** ((n.bit_length() - 1) // 2)
        return HierarchicalMoE(d, h, a, n // a)
    return MoE(d, h, int(entry), k=4)


def time_pair(entry: str, args: argparse.Namespace) -> dict:
    """Median step seconds with and without the copies, and the casts per step of the former."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = [nn.Module(), nn.Module()]
    models[0].moe = build(entry, args.d_model, args.d_hidden).to(device).train()
    models[1].moe = copy.deepcopy(models[0].moe)
    models[1].moe.experts.keep_compute_copies = False
    optims = [build_optimizers(m, TrainSection(lr=1e-3))[0] for m in models]
    x = torch.randn(args.tokens, args.d_model, device=device)
    times: list[list[float]] = [[], []]
    for step in range(args.warmup + args.reps):
        for i in (0, 1) if step % 2 else (1, 0):  # alternating which goes first (it runs slower)
            model, opts = models[i], optims[i]
            model.zero_grad(set_to_none=True)
            xs = x.clone().requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model.moe(xs, generator=torch.Generator(device).manual_seed(step))
            (out.y.float().square().mean() + out.aux_loss).backward()
            if args.optimizer == "trainer":
                for opt in opts:
                    opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times[i].append(time.perf_counter() - start)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), "the copies changed the training"
    steps = args.warmup + args.reps
    kept = models[0].moe.experts.compute_copies
    return {
        "on_ms": 1e3 * statistics.median(times[0]),
        "off_ms": 1e3 * statistics.median(times[1]),
        "full_casts": sum(c.full_casts for c in kept) / 2 / steps,
        "rows": sum(c.rows_cast for c in kept) / 2 / steps,
        "experts": models[0].moe.experts.w_in.shape[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="256,4096-h")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--optimizer", choices=("none", "trainer"), default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16 autocast, {args.device}, d={args.d_model} h={args.d_hidden}, {args.tokens} tokens")
    print("experts  optimizer  copies_off_ms  copies_on_ms  on/off  full_casts/step  rows/step")
    for entry in args.experts.split(","):
        r = time_pair(entry, args)
        print(
            f"{entry:>7}  {args.optimizer:>9}  {r['off_ms']:13.2f}  {r['on_ms']:12.2f}  "
            f"{r['on_ms'] / r['off_ms']:6.3f}  {r['full_casts']:15.2f}  {r['rows']:9.1f}"
        )


if __name__ == "__main__":
    main()
