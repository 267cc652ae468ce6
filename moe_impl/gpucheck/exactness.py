"""Exactness on the device: the layers in float32 there against the CPU float64 reference (outputs,
aux loss, routing, every gradient), bf16 autocast within a stated tolerance, eval mode; the two
expert kernels (grouped GEMM and blocked) against each other; and 131072 experts forward + backward
with sparse expert gradients.

The gate noise is what would differ between devices (each draws from its own generator), so both
sides draw it from one seeded CPU stream in float64 (`SharedNoise`, passed to the layer as its
noise source), cast to each side's device and dtype: the reference and the device then route the
same tokens to the same experts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moe_impl.gpucheck.build import on_device
from moe_impl.gpucheck.report import CheckFailed, SectionSkipped
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.timing import free_memory, peak_gib
from moe_impl.layer.base import MoELayer
from moe_impl.layer.flat import MoE
from moe_impl.layer.grouped import choose_kernel, expert_kernel, grouped_mm_available
from moe_impl.layer.hierarchical import HierarchicalMoE

# Tolerances per tensor. float32 (24-bit mantissa) against float64: max |a - b| / max |ref|.
# bf16 (8 bits) in the 2-norm, ||a - b|| / ||ref||: a gradient entry fed by few tokens can move by
# several percent where a ReLU input near 0 flips sign, which the max norm would flag. On our
# CPU the bf16 layer's gradients differ from float64 by up to ~4.5% in the 2-norm (a bare bf16
# MLP there: ~3.8% at d=512); a wrong route, a missing expert or a bad cast gives errors of order 1.
TOL_FLOAT32 = 1e-4
TOL_BF16 = 1e-1
TOL_KERNELS_BF16 = 2e-2  # grouped vs blocked, both bf16: rounding points and summation order


class SharedNoise:
    """A layer's noise source (layer/gating.py: NoiseSource) drawing every sample from one seeded
    CPU stream in float64, cast to the device and dtype the layer asks for: a float64 reference on
    the CPU and a float32 or bf16 layer on the device given `SharedNoise(seed)` each get the same
    noise, and so route alike."""

    def __init__(self, seed: int) -> None:
        self.stream = torch.Generator().manual_seed(seed)

    def __call__(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        draw = torch.randn(shape, generator=self.stream, dtype=torch.float64)
        return draw.to(device=like.device, dtype=like.dtype)


def _pair(value: Tensor, reference: Tensor) -> tuple[Tensor, Tensor] | None:
    """The two tensors made comparable: sparse pairs as their coalesced values (None when their
    rows differ), never densified (at 131072 experts a dense gradient is gigabytes); tensors on
    different devices on the CPU in float64, others where they are, in float32 or float64."""
    value, reference = value.detach(), reference.detach()
    if value.is_sparse and reference.is_sparse:
        value, reference = value.coalesce(), reference.coalesce()
        if not torch.equal(value.indices().cpu(), reference.indices().cpu()):
            return None
        value, reference = value.values(), reference.values()
    value = value.to_dense() if value.is_sparse else value
    reference = reference.to_dense() if reference.is_sparse else reference
    if value.shape != reference.shape:
        return None
    if value.device != reference.device:
        value, reference = value.double().cpu(), reference.double().cpu()
    dtype = torch.float64 if torch.float64 in (value.dtype, reference.dtype) else torch.float32
    return value.to(dtype), reference.to(dtype)


def rel_error(value: Tensor, reference: Tensor, norm: str = "max") -> float:
    """|value - reference| / |reference| in the max norm ("max") or the 2-norm ("l2"); inf when
    the shapes or the sparse rows differ."""
    pair = _pair(value, reference)
    if pair is None:
        return math.inf
    value, reference = pair
    if value.numel() == 0:
        return 0.0
    if norm == "max":
        scale, diff = reference.abs().max().item(), (value - reference).abs().max().item()
    else:
        scale, diff = reference.norm().item(), (value - reference).norm().item()
    return diff / (scale if scale > 0 else 1.0)


def randomize_gates(layer: MoELayer, seed: int) -> None:
    """Non-zero gate weights, so that routing depends on the input (zero gates route at random)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "gate" in name:
                d_model = layer.config.d_model
                p.copy_(
                    torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(d_model)
                )


def run_step(
    layer: nn.Module, x: Tensor, probe: Tensor, *, train: bool, bf16: bool, seed: int
) -> dict[str, Tensor]:
    """One forward (+ backward in training) with shared noise: y, aux, counts and every gradient."""
    layer.train(train)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(train)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = layer(x, generator=SharedNoise(seed))
    results = {"y": out.y.float(), "aux_loss": out.aux_loss.float().reshape(1)}
    results["tokens_per_expert"] = out.stats.tokens_per_expert.float()
    if train:
        ((out.y.float() * probe).sum() + out.aux_loss.float()).backward()
        results["grad_x"] = x.grad
        for name, p in layer.named_parameters():
            if p.grad is not None:
                results[f"grad_{name}"] = p.grad
    return results


def compare(results: dict, reference: dict, tol: float, what: str, norm: str = "max") -> list[dict]:
    """One row per tensor (both norms); CheckFailed after all rows if any tensor's error in `norm`
    is above `tol`, or the routing (tokens per expert) differs at all."""
    rows, bad = [], []
    missing = sorted(set(reference) ^ set(results))
    if missing:
        raise CheckFailed(f"{what}: tensors present on one side only: {missing}")
    for key, ref in reference.items():
        errors = {n: rel_error(results[key], ref, n) for n in ("max", "l2")}
        ok = errors["max"] == 0.0 if key == "tokens_per_expert" else errors[norm] <= tol
        rows.append(
            {
                "case": what,
                "tensor": key,
                "rel_error_max": errors["max"],
                "rel_error_l2": errors["l2"],
                "tolerance": f"{tol:g} ({norm})",
                "ok": ok,
            }
        )
        if not ok:
            bad.append(f"{key} {errors[norm]:.2e}")
    if bad:
        raise CheckFailed(f"{what}: outside tolerance {tol:g} ({norm} norm): {', '.join(bad)}")
    return rows


def _layers(sizes: Sizes) -> list[tuple[str, Callable[[], MoELayer]]]:
    d, h, n = sizes.exact_d, sizes.exact_h, sizes.exact_experts
    a, b = sizes.exact_groups
    return [
        (f"MoE n={n} k=4", lambda: MoE(d, h, n, k=4)),
        (f"HierarchicalMoE {a}x{b} k=2+2", lambda: HierarchicalMoE(d, h, a, b)),
    ]


def check_against_reference(device: torch.device, sizes: Sizes) -> dict:
    """float32 (and bf16 autocast) on `device` against the float64 CPU reference."""
    rows: list[dict] = []
    failures: list[str] = []
    for i, (label, factory) in enumerate(_layers(sizes)):
        torch.manual_seed(i)
        reference = factory().double()
        randomize_gates(reference, seed=100 + i)
        layer = copy.deepcopy(reference).float().to(device)
        gen = torch.Generator().manual_seed(200 + i)
        x = torch.randn(sizes.exact_tokens, sizes.exact_d, generator=gen, dtype=torch.float64)
        probe = torch.randn(sizes.exact_tokens, sizes.exact_d, generator=gen, dtype=torch.float64)
        cases = [
            ("train float32", True, False, TOL_FLOAT32, "max"),
            ("eval float32", False, False, TOL_FLOAT32, "max"),
            ("train bf16 autocast", True, True, TOL_BF16, "l2"),
        ]
        for case, train, bf16, tol, norm in cases:
            ref = run_step(reference, x, probe, train=train, bf16=False, seed=i)
            got = run_step(
                layer,
                x.float().to(device),
                probe.float().to(device),
                train=train,
                bf16=bf16,
                seed=i,
            )
            try:
                rows += compare(got, ref, tol, f"{label}, {case}", norm)
            except CheckFailed as err:
                failures.append(str(err))
    if failures:
        raise CheckFailed("; ".join(failures))
    worst = {
        case: max(r[key] for r in rows if case in r["case"])
        for case, key in (("float32", "rel_error_max"), ("bf16", "rel_error_l2"))
    }
    return {
        "tolerances": {"float32 (max norm)": TOL_FLOAT32, "bf16 (2-norm)": TOL_BF16},
        "worst": worst,
        "comparisons": rows,
    }


def check_kernels(device: torch.device, sizes: Sizes) -> dict:
    """The grouped-GEMM and blocked expert kernels on `device` in bf16 autocast, and the wide FFN
    against the blocked one on a flat layer with k = E: same routing, outputs and gradients within
    TOL_KERNELS_BF16; and which one `auto` picks here."""
    if not grouped_mm_available():
        raise SectionSkipped(f"torch {torch.__version__} has no torch._grouped_mm")
    d, h = sizes.kernel_d, sizes.kernel_h
    a, b = sizes.kernel_groups
    auto = choose_kernel(device, torch.bfloat16, d, h)
    rows: list[dict] = []
    failures: list[str] = []
    # (label, the kernel held to the blocked one, layer): the wide FFN (moe_impl/layer/wide.py)
    # where it applies, a flat layer with k = E
    n = sizes.kernel_experts
    factories = [
        (f"MoE n={n}", "grouped", lambda: MoE(d, h, n, k=4)),
        (f"HierarchicalMoE {a}x{b}", "grouped", lambda: HierarchicalMoE(d, h, a, b)),
        (f"MoE n={n} sparse grads", "grouped", lambda: MoE(d, h, n, k=4, sparse_grad=True)),
        ("MoE n=4 k=4", "wide", lambda: MoE(d, h, 4, k=4)),
    ]
    for i, (label, other, factory) in enumerate(factories):
        torch.manual_seed(i)
        layer = factory().to(device)
        randomize_gates(layer, seed=300 + i)
        gen = torch.Generator().manual_seed(400 + i)
        x = torch.randn(sizes.kernel_tokens, d, generator=gen).to(device)
        probe = torch.randn(sizes.kernel_tokens, d, generator=gen).to(device)
        with expert_kernel("blocked"):
            blocked = run_step(layer, x, probe, train=True, bf16=True, seed=i)
        with expert_kernel(other):
            out = run_step(layer, x, probe, train=True, bf16=True, seed=i)
        try:
            rows += compare(out, blocked, TOL_KERNELS_BF16, f"{label}, {other} vs blocked", "l2")
        except CheckFailed as err:
            failures.append(str(err))
    if failures:
        raise CheckFailed("; ".join(failures))
    return {"auto_kernel_bf16": auto, "tolerance": TOL_KERNELS_BF16, "comparisons": rows}


def check_scale(device: torch.device, sizes: Sizes) -> dict:
    """131072 experts (a x b), bf16 autocast: forward + backward; the expert gradients are sparse
    over exactly the experts that received tokens; memory beyond the parameters stays below one
    float32 tokens x experts tensor. With both kernels available they agree."""
    a, b = sizes.scale_groups
    d, h, tokens = sizes.scale_d, sizes.scale_h, sizes.scale_tokens
    num_experts = a * b
    free_memory(device)
    layer = on_device(lambda: HierarchicalMoE(d, h, a, b), device)
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    x = torch.randn(tokens, d, device=device)
    probe = torch.randn(tokens, d, device=device)
    results: dict[str, Any] = {
        "experts": num_experts,
        "d_model": d,
        "d_hidden": h,
        "tokens": tokens,
        "params": sum(p.numel() for p in layer.parameters()),
        "param_gib": param_bytes / 2**30,
    }
    kernels = ["auto"] + (["blocked", "grouped"] if grouped_mm_available() else [])
    outs = {}
    for kernel in kernels:
        with expert_kernel(kernel):
            outs[kernel] = run_step(layer, x, probe, train=True, bf16=True, seed=7)
        if kernel == "auto" and device.type == "cuda":
            results["peak_gib_after_auto_step"] = peak_gib(device)
    out = outs["auto"]
    counts = out["tokens_per_expert"]
    active = int((counts > 0).sum())
    grad_in = out["grad_experts.w_in"]
    if not grad_in.is_sparse:
        raise CheckFailed("expert gradient w_in is dense at 131072 experts (expected sparse COO)")
    rows = grad_in.coalesce().indices()[0]
    expected = counts.nonzero().squeeze(1)
    if not torch.equal(rows.cpu(), expected.cpu()):
        raise CheckFailed(
            f"sparse gradient rows ({rows.numel()}) are not the {active} experts that got tokens"
        )
    if not torch.isfinite(out["y"]).all():
        raise CheckFailed("non-finite outputs at 131072 experts")
    results.update(active_experts=active, sparse_grad_rows=int(rows.numel()))
    if device.type == "cuda":
        extra = results["peak_gib_after_auto_step"] * 2**30 - param_bytes
        dense_te = tokens * num_experts * 4
        results.update(
            extra_over_params_gib=extra / 2**30, tokens_x_experts_fp32_gib=dense_te / 2**30
        )
        if extra > dense_te:
            raise CheckFailed(
                f"peak memory exceeds the parameters by {extra / 2**30:.2f} GiB, more than one "
                f"float32 tokens x experts tensor ({dense_te / 2**30:.2f} GiB)"
            )
    if "grouped" in outs:
        rows_cmp = compare(
            outs["grouped"],
            outs["blocked"],
            TOL_KERNELS_BF16,
            "131072 experts, grouped vs blocked",
            "l2",
        )
        results["kernels_worst_rel_error_l2"] = max(r["rel_error_l2"] for r in rows_cmp)
    return {"layer": results}
