"""Speed on the device, bf16 autocast:
- the MoE layer against a FLOP-matched dense FFN `Linear(d, k·h) -> ReLU -> Linear(k·h, d)` at
  the paper's expert shape (d_model 512, d_hidden 1024), at fixed tokens per expert, with each
  expert kernel (bench's protocol, moe_impl/cli/bench.py: forward + backward, gradients set to
  None between steps); the expert weights kept in bf16 between steps (compute_copy.py), the first
  kernel's eager step also timed with them cast in every forward (`weights_cast_ms`);
- the language models' training step (forward, backward, clipping, optimizer) of the paper's
  1-Billion-Word presets that fit one GPU, TFLOPS per GPU and MFU beside Table 7's column.
Achieved TFLOPS count the analytic FLOPs (moe_impl/model/flops.py), as training does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from moe_impl import telemetry
from moe_impl.bench.peers import build_moe
from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, gate_outputs, parse_experts, train_flops
from moe_impl.gpucheck.build import on_device
from moe_impl.gpucheck.profile import PROFILE_RULE, profile_step
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.timing import free_memory, is_oom, peak_gib, time_first_steps, time_steps
from moe_impl.layer.base import MoELayer
from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.grouped import choose_kernel, expert_kernel, grouped_mm_available
from moe_impl.model import flops
from moe_impl.model.config import ModelConfig
from moe_impl.model.lm import MoELanguageModel
from moe_impl.model.presets import ALL_PRESETS, PAPER_VALUES
from moe_impl.runs import runinfo
from moe_impl.train import micro
from moe_impl.train.config import TrainSection
from moe_impl.train.optim import build_optimizers, clip_gradients


def bf16_peak(device: torch.device) -> float | None:
    peak, _ = telemetry.resolve_peak_flops(
        str(device), "bfloat16", device_name=runinfo.device_name(str(device))
    )
    return peak


def _layer_step(layer: nn.Module, x: torch.Tensor, is_moe: bool):
    """One training step of `layer` on `x`; x requires grad, so the input gradient is computed
    (as in a model, and as the TFLOPS count it)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = layer(x)
        y = out.y if is_moe else out
        loss = y.float().square().mean()
        (loss + out.aux_loss if is_moe else loss).backward()

    return step


def _speed_row(
    row: dict, kernel: str, moe_s: float, dense_s: float, shape: tuple, peak, device
) -> dict:
    """One layer_speed row: `shape` = (tokens, d, h, k, gate outputs) of the timed steps."""
    tokens, d, h, k, gates = shape
    tflops = train_flops(tokens, d, h, k, gates) / moe_s / 1e12
    return {
        **row,
        "kernel": kernel,
        "moe_ms": 1e3 * moe_s,
        "dense_ms": 1e3 * dense_s,
        "moe_us_per_token": 1e6 * moe_s / tokens,
        "ratio_to_dense": moe_s / dense_s,
        "moe_tflops": tflops,
        "dense_tflops": train_flops(tokens, d, h, k, 0) / dense_s / 1e12,
        "mfu": telemetry.mfu(tflops, peak),
        "peak_gib": peak_gib(device),
    }


def time_weights_cast(layer: nn.Module, step, device: torch.device, sizes: Sizes) -> float:
    """Median seconds per step of `step` with the experts' weights cast to bf16 in every forward
    (ExpertBank.keep_compute_copies off, as before the banks kept them; moe_impl/layer/
    compute_copy.py), then the copies kept again."""
    banks = [m for m in layer.modules() if isinstance(m, ExpertBank)]
    for bank in banks:
        bank.keep_compute_copies = False
    try:
        return time_steps(step, device, warmup=sizes.warmup, reps=sizes.reps)["median_s"]
    finally:
        for bank in banks:
            bank.keep_compute_copies = True


def _routing_rows(row: dict, moe: nn.Module, x: torch.Tensor, kernel: str, ctx: dict) -> list:
    """The layer's rows at one size and kernel: eager, then compiled where `ctx["compile"]`
    (MoELayer.compile_routing with ctx's compile kwargs; its compile time beside it). The first
    kernel's eager row also has `weights_cast_ms`: the step with the expert weights cast in every
    forward instead of kept in bf16 (the steps here change no weight, so the kept copies are never
    recast; a training step recasts the rows its optimizer changed)."""
    sizes, device = ctx["sizes"], ctx["device"]
    step = _layer_step(moe, x, True)
    rows = []
    with expert_kernel(kernel):
        moe_s = time_steps(step, device, warmup=sizes.warmup, reps=sizes.reps)["median_s"]
        rows.append(_speed_row({**row, "routing": "eager"}, kernel, moe_s, *ctx["rest"]))
        if kernel == ctx["kernels"][0]:
            rows[-1]["weights_cast_ms"] = 1e3 * time_weights_cast(moe, step, device, sizes)
        if ctx["compile"]:
            moe_s, compile_s = time_compiled(moe, step, device, sizes)
            compiled = {**row, "routing": "compiled", "compile_s": compile_s}
            rows.append(_speed_row(compiled, kernel, moe_s, *ctx["rest"]))
    return rows


def time_compiled(
    layer: nn.Module, step, device: torch.device, sizes: Sizes
) -> tuple[float, float]:
    """(median seconds per step, compile seconds) of `step` with every MoE layer in `layer` compiled
    (sizes.compile_kwargs), then eager again: the compile time is what its first two steps took
    beyond two timed medians (the second may recompile with dynamic shapes). Past dynamo's
    recompile limit a function would silently run eagerly, so hitting it is an error here."""
    layers = [m for m in layer.modules() if isinstance(m, MoELayer)]
    for m in layers:
        m.compile_routing(**sizes.compile_kwargs)
    try:
        with _fail_on_recompile_limit():
            first_s = time_first_steps(step, device, 2)
            median_s = time_steps(step, device, warmup=sizes.warmup, reps=sizes.reps)["median_s"]
    finally:
        for m in layers:
            m.eager_routing()
    return median_s, max(0.0, first_s - 2 * median_s)


def _fail_on_recompile_limit() -> contextlib.AbstractContextManager:
    """dynamo's fail_on_recompile_limit_hit for the code inside, where this torch has it."""
    config = torch._dynamo.config
    if hasattr(config, "fail_on_recompile_limit_hit"):
        return config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _layer_rows(spec, moe, dense, m: int, kernels: list[str], ctx: dict) -> list[dict]:
    """layer_speed's rows of one layer at m tokens per expert (and its profiles into ctx)."""
    sizes, device = ctx["sizes"], ctx["device"]
    d, h, k = sizes.speed_d, sizes.speed_h, ctx["k"]
    tokens = math.ceil(m * spec.num_experts / k)
    row = {
        "experts": spec.config,
        "tokens": tokens,
        "tokens_per_expert": m,
        "auto_picks": "wide"
        if kernels[0] == "wide"
        else choose_kernel(device, torch.bfloat16, d, h, spec.num_experts),
    }
    try:
        x = torch.randn(tokens, d, device=device, requires_grad=True)
        dense_s = time_steps(
            _layer_step(dense, x, False), device, warmup=sizes.warmup, reps=sizes.reps
        )["median_s"]
        largest = m == max(sizes.speed_tokens_per_expert)
        shape = (tokens, d, h, k, gate_outputs(spec))
        rows = []
        for kernel in kernels:
            compiled = largest and kernel == kernels[0] and spec.config in sizes.compile_experts
            sub = {**ctx, "compile": compiled, "rest": (dense_s, shape, ctx["peak"], device)}
            rows += _routing_rows(row, moe, x, kernel, sub)
        if spec.config in sizes.profile_experts and largest:
            name = f"{spec.config} at {m} tokens per expert, {kernels[0]}"
            _profiles(moe, x, name, spec.config in sizes.compile_experts, ctx)
        return rows
    except Exception as err:
        if not is_oom(err):
            raise
        free_memory(device)
        return [{**row, "status": "out of memory"}]


def _profiles(moe, x, name: str, compiled: bool, ctx: dict) -> None:
    """Profiles of one step, eager and (where it is compiled at this size) compiled."""
    sizes, device, kernel = ctx["sizes"], ctx["device"], ctx["kernels"][0]
    step = _layer_step(moe, x, True)
    with expert_kernel(kernel):
        ctx["profiles"][f"{name}, eager"] = profile_step(step, device)
        if compiled:
            moe.compile_routing(**sizes.compile_kwargs)
            try:
                ctx["profiles"][f"{name}, compiled"] = profile_step(step, device)
            finally:
                moe.eager_routing()


def layer_kernels(spec, k: int, kernels: list[str], device: torch.device) -> list[str]:
    """The kernels to time for one layer, the automatic choice first: with k = E (flat) also the
    wide FFN (moe_impl/layer/wide.py), which the automatic choice takes on CUDA."""
    if spec.hierarchical or k != spec.num_experts:
        return kernels
    return ["wide", *kernels] if device.type == "cuda" else [*kernels, "wide"]


def layer_speed(device: torch.device, sizes: Sizes) -> dict:
    """One row per (experts, tokens per expert, kernel, routing eager or compiled); a configuration
    that runs out of memory is recorded as such and the others go on."""
    d, h = sizes.speed_d, sizes.speed_h
    peak = bf16_peak(device)
    auto = choose_kernel(device, torch.bfloat16, d, h)
    # both kernels where torch has the grouped one (on a CPU it runs too, slowly: toy size only);
    # the first is the one the profiles, the compiled rows and worst_ratio_to_dense use
    kernels = ["grouped", "blocked"] if device.type == "cuda" else ["blocked", "grouped"]
    if not grouped_mm_available():
        kernels = ["blocked"]
    rows: list[dict[str, Any]] = []
    ctx: dict[str, Any] = {"sizes": sizes, "device": device, "peak": peak, "kernels": kernels}
    ctx["profiles"] = {}
    for spec in parse_experts(",".join(sizes.speed_experts)):
        ctx["k"] = k = K_PRIMARY * K_SECONDARY if spec.hierarchical else 4
        ctx["kernels"] = layer_kernels(spec, k, kernels, device)
        free_memory(device)
        try:
            # (mypy cannot infer the type of a lambda with defaults)
            moe = on_device(lambda spec=spec, k=k: build_moe(spec, d, h, k), device).train()  # type: ignore[misc]
        except Exception as err:
            if not is_oom(err):
                raise
            rows.append({"experts": spec.config, "status": "out of memory building the layer"})
            continue
        dense = nn.Sequential(
            nn.Linear(d, k * h, bias=False), nn.ReLU(), nn.Linear(k * h, d, bias=False)
        ).to(device)
        for m in sizes.speed_tokens_per_expert:
            rows += _layer_rows(spec, moe, dense, m, ctx["kernels"], ctx)
        del moe, dense
    best = [
        r for r in rows if r.get("kernel") == r.get("auto_picks") and r.get("routing") == "eager"
    ]
    return {
        "d_model": d,
        "d_hidden": h,
        "auto_kernel": auto,
        "peak_tflops": None if peak is None else peak / 1e12,
        "worst_ratio_to_dense": max((r["ratio_to_dense"] for r in best), default=None),
        "input_gradient": "computed (x requires grad), and counted in the TFLOPS",
        "profile_rule": PROFILE_RULE,
        "rows": rows,
        **{f"profile: {name}": table for name, table in ctx["profiles"].items()},
    }


def time_lm_step(
    cfg: ModelConfig,
    train: TrainSection,
    device: torch.device,
    *,
    batch: int,
    seq_len: int,
    warmup: int,
    reps: int,
    micro_batches: int = 1,
    compile_sizes: Sizes | None = None,
) -> dict:
    """Seconds per training step of the language model `cfg` (forward, backward, clipping, the
    optimizers training builds from `train`) on random tokens of its vocabulary, in train.dtype;
    with `micro_batches` the step's rows go through in that many forward and backward passes
    before the one update, as the trainer accumulates them (moe_impl/train/micro.py). With
    `compile_sizes`, the MoE layers' routing is compiled (time_compiled, with those sizes'
    compile kwargs, warm-up and repetitions) and the result has its compile_s."""
    free_memory(device)
    model = on_device(lambda: MoELanguageModel(cfg), device).train()
    optimizers, _ = build_optimizers(model, train)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device, generator=gen)
    scored = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    bf16 = train.dtype == "bfloat16"

    parts = micro.split_rows((inputs, targets, scored), micro_batches)

    def step() -> None:
        for part in parts:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(*part, generator=gen)
            loss = out.nll_sum.float() / inputs.numel() + out.aux_loss.float() / micro_batches
            loss.backward()
        if micro_batches > 1:
            micro.coalesce_sparse_grads(model)
        clip_gradients(model, train.clip_norm, distributed=False)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    if compile_sizes is None:
        result: dict[str, Any] = time_steps(step, device, warmup=warmup, reps=reps)
    else:
        median_s, compile_s = time_compiled(model, step, device, compile_sizes)
        result = {"median_s": median_s, "compile_s": compile_s}
    result["peak_gib"] = peak_gib(device)
    return result


def lm_step_speed(device: torch.device, sizes: Sizes) -> dict:
    """The training step of each preset on random tokens of its own vocabulary (sampled softmax
    as the preset sets it), bf16 autocast, Adam / factored Adam as training builds them; eager,
    and for sizes.lm_compile_presets also with the MoE layers' routing compiled."""
    peak = bf16_peak(device)
    tokens = sizes.lm_batch * sizes.lm_seq
    rows = []
    for name in sizes.lm_presets:
        for compiled in (False, True) if name in sizes.lm_compile_presets else (False,):
            rows.append(_lm_row(name, compiled, device, sizes, peak))
    return {
        "tokens_per_step": tokens,
        "paper_column": "Table 7 TFLOPS/GPU: 16 or 32 K40s, float32; ours: one GPU, bf16",
        "rows": rows,
    }


def _lm_row(name: str, compiled: bool, device: torch.device, sizes: Sizes, peak) -> dict:
    """lm_step's row of one preset, eager or with its routing compiled."""
    cfg = ALL_PRESETS[name]
    paper = PAPER_VALUES.get("lm1b/" + name.split("/", 1)[1])
    tokens = sizes.lm_batch * sizes.lm_seq
    row = {
        "preset": name,
        "routing": "compiled" if compiled else "eager",
        "batch": sizes.lm_batch,
        "seq_len": sizes.lm_seq,
        "params_b": flops.total_params(cfg) / 1e9,
    }
    train = TrainSection(lr=1e-4, dtype="bfloat16")
    try:
        timed = time_lm_step(
            cfg,
            train,
            device,
            batch=sizes.lm_batch,
            seq_len=sizes.lm_seq,
            warmup=2,
            reps=sizes.lm_reps,
            compile_sizes=replace(sizes, warmup=2, reps=sizes.lm_reps) if compiled else None,
        )
    except Exception as err:
        if not is_oom(err):
            raise
        return {**row, "status": "out of memory"}
    step_s = timed["median_s"]
    tflops = flops.train_flops_per_token(cfg) * tokens / step_s / 1e12
    return {
        **row,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "tflops_per_gpu": tflops,
        "mfu": telemetry.mfu(tflops, peak),
        "peak_gib": timed["peak_gib"],
        "compile_s": timed.get("compile_s"),
        "paper_tflops_per_gpu": None if paper is None else paper.tflops_per_gpu,
    }
