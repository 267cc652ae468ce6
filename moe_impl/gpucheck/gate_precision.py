"""The gate precision on the device (MoEConfig.gate_precision, moe_impl/layer/gate_precision.py):
what tensor-core gate matmuls cost in routing and buy in time.

- exactness: the device's bf16 gate logits (one bf16 GEMM with a float32 output, flat and blocked)
  and the flat weight gradient against bf16-rounded operands multiplied in float64 on the CPU,
  within float32 rounding; TF32 logits within TF32 rounding of float64, and not float32's (else
  TF32 was not in effect);
- flips: the share of routing choices that bf16 and TF32 change against float32
  (layer/routing_flips.py), on layers with random gates over random inputs at the speed sizes, and
  on trained runs where run directories are given (moe_impl/train/flips.py);
- cost: one training step of those layers (bf16 autocast, forward + backward) at each precision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from moe_impl.bench.peers import build_moe
from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, parse_experts
from moe_impl.gpucheck.build import on_device
from moe_impl.gpucheck.exactness import randomize_gates, rel_error
from moe_impl.gpucheck.report import CheckFailed
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.timing import free_memory, time_steps
from moe_impl.layer.config import GATE_PRECISIONS
from moe_impl.layer.flat import MoE
from moe_impl.layer.gate_precision import round_to_bf16
from moe_impl.layer.gating import GatingNetwork, gate_matmul
from moe_impl.layer.hierarchical import HierarchicalMoE, block_gate_matmul
from moe_impl.layer.routing_flips import routing_flips
from moe_impl.train import checkpoint
from moe_impl.train.flips import measure_run

TOL_BF16_LOGITS = 1e-5  # max norm: float32 accumulation of exact bf16 products, another order
TOL_TF32_LOGITS = 5e-3  # max norm: operands with 10-bit mantissas


def _bf16_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return round_to_bf16(a.float()).double() @ round_to_bf16(b.float()).double()


def logit_errors(device: torch.device, sizes: Sizes) -> dict:
    """Max-norm errors of the device's gate logits at bf16 and TF32 (module docstring);
    CheckFailed when one is out of tolerance or TF32 gives float32's logits bit for bit."""
    gen = torch.Generator().manual_seed(0)
    d, n, rows = sizes.speed_d, sizes.exact_experts, sizes.exact_tokens
    x = torch.randn(rows, d, generator=gen)
    w = torch.randn(d, n, generator=gen) / math.sqrt(d)
    g = torch.randn(rows, n, generator=gen)
    x_dev, w_dev = x.to(device), w.to(device).requires_grad_(True)
    logits = gate_matmul(x_dev, w_dev, "bf16")
    logits.backward(g.to(device))
    a, b = sizes.exact_groups
    x_LCD = torch.randn(a, rows // a, d, generator=gen)
    w_GDS = torch.randn(a, d, b, generator=gen) / math.sqrt(d)
    blocked = block_gate_matmul(x_LCD.to(device), w_GDS.to(device), None, None, "bf16")
    tf32 = gate_matmul(x_dev, w_dev.detach(), "tf32")
    assert w_dev.grad is not None  # the backward just ran
    errors = {
        "bf16 logits": rel_error(logits.detach().cpu().double(), _bf16_reference(x, w)),
        "bf16 weight gradient": rel_error(w_dev.grad.cpu().double(), _bf16_reference(x.t(), g)),
        "bf16 blocked logits": rel_error(
            blocked.cpu().double(), _bf16_reference(x_LCD, w_GDS).double()
        ),
        "tf32 logits": rel_error(tf32.cpu().double(), x.double() @ w.double()),
    }
    tf32_differs = not torch.equal(tf32, gate_matmul(x_dev, w_dev.detach(), "float32"))
    bad = [
        k for k, e in errors.items() if e > (TOL_TF32_LOGITS if "tf32" in k else TOL_BF16_LOGITS)
    ]
    if bad:
        raise CheckFailed(f"gate logits out of tolerance: {', '.join(bad)} ({errors})")
    if device.type == "cuda" and not tf32_differs:
        raise CheckFailed("tf32 gate logits equal float32's bit for bit: TF32 was not in effect")
    return {**errors, "tf32 differs from float32": tf32_differs}


def set_gate_precision(layer: MoE | HierarchicalMoE, precision: str) -> None:
    """Switch a built layer's gate matmuls (and its config) to `precision`, weights kept."""
    for module in layer.modules():
        if isinstance(module, GatingNetwork):
            module.precision = precision
    layer.config = dataclasses.replace(layer.config, gate_precision=precision)


def _step(layer, x_BD: torch.Tensor):
    def step() -> None:
        with torch.autocast(x_BD.device.type, dtype=torch.bfloat16):
            out = layer(x_BD)
        (out.y.float().square().mean() + out.aux_loss.float()).backward()
        for p in layer.parameters():
            p.grad = None

    return step


def layer_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    """Per layer of sizes.profile_experts at the smallest tokens per expert: the flip share of
    bf16 and TF32 (eval, random gates and inputs) and a training step's time at each precision."""
    rows = []
    d, h, m = sizes.speed_d, sizes.speed_h, min(sizes.speed_tokens_per_expert)
    for spec in parse_experts(",".join(sizes.profile_experts)):
        k = K_PRIMARY * K_SECONDARY if spec.hierarchical else 4
        free_memory(device)
        layer = on_device(lambda spec=spec, k=k: build_moe(spec, d, h, k), device)  # type: ignore[misc]
        assert isinstance(layer, MoE | HierarchicalMoE)  # build_moe builds one of ours
        randomize_gates(layer, seed=1)
        tokens = math.ceil(m * spec.num_experts / k)
        x_BD = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2)).to(device)
        row: dict = {"experts": spec.config, "tokens": tokens}
        layer.eval()
        for p in ("bf16", "tf32"):
            row[f"{p}_flip_share"] = routing_flips(layer, x_BD, p).share
        layer.train()
        x_BD.requires_grad_(True)
        for p in GATE_PRECISIONS:
            set_gate_precision(layer, p)
            timed = time_steps(_step(layer, x_BD), device, warmup=sizes.warmup, reps=sizes.reps)
            row[f"{p}_step_ms"] = 1e3 * timed["median_s"]
        set_gate_precision(layer, "float32")
        rows.append(row)
        del layer, x_BD
    return rows


def check_gate_precision(
    device: torch.device, sizes: Sizes, run_dirs: Sequence[str | Path] = ()
) -> dict:
    """The section: exactness, flips and cost of the gate precisions on `device` (module
    docstring); `run_dirs`: trained runs whose held-out routing is measured too."""
    result: dict = {
        "logit_errors": logit_errors(device, sizes),
        "layers": layer_rows(device, sizes),
    }
    result["runs"] = [
        measure_run(Path(r), ["bf16", "tf32"], device, tokens=sizes.trainer_eval_tokens)
        for r in run_dirs
    ]
    return result


def check_gate_precision_after_trainer(device: torch.device, sizes: Sizes, out_dir: Path) -> dict:
    """The section as gpu-check runs it: `check_gate_precision`, with the trainer section's run
    (out_dir / "trainer_run") measured too where it left a checkpoint."""
    run_dir = Path(out_dir) / "trainer_run"
    runs = [run_dir] if checkpoint.latest(run_dir) is not None else []
    return check_gate_precision(device, sizes, runs)
