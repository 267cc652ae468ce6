"""Speed on the device, bf16 autocast:
- the MoE layer against a FLOP-matched dense FFN `Linear(d, k·h) -> ReLU -> Linear(k·h, d)` at
  the paper's expert shape (d_model 512, d_hidden 1024), at fixed tokens per expert, with each
  expert kernel (bench's protocol, moe_impl/cli/bench.py: forward + backward, gradients set to
  None between steps);
- the language models' training step (forward, backward, clipping, optimizer) of the paper's
  1-Billion-Word presets that fit one GPU, TFLOPS per GPU and MFU beside Table 7's column.
Achieved TFLOPS count the analytic FLOPs (moe_impl/model/flops.py), as training does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moe_impl import telemetry
from moe_impl.bench.peers import build_moe
from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, gate_outputs, parse_experts, train_flops
from moe_impl.gpucheck.build import on_device
from moe_impl.gpucheck.sizes import Sizes
from moe_impl.gpucheck.timing import free_memory, is_oom, peak_gib, sync, time_steps
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
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = layer(x)
        y = out.y if is_moe else out
        loss = y.float().square().mean()
        (loss + out.aux_loss if is_moe else loss).backward()

    return step


def profile_step(step, device: torch.device, rows: int = 15) -> list[dict]:
    """Where one step's time goes: the GPU kernels with the most time (on a CPU, the ops with the
    most self time), per step over 3 profiled steps after one warm-up."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if cuda:  # the kernels themselves (an op's "self" device time repeats its kernels')
        events = [e for e in events if e.device_type.name == "CUDA"]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "op": e.key[:60],
            "calls_per_step": e.count / 3,
            "ms_per_step": getattr(e, attr) / 3e3,
            "share": getattr(e, attr) / total,
        }
        for e in events[:rows]
    ]


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


def layer_speed(device: torch.device, sizes: Sizes) -> dict:
    """One row per (experts, tokens per expert, kernel); a configuration that runs out of memory
    is recorded as such and the others go on."""
    d, h = sizes.speed_d, sizes.speed_h
    peak = bf16_peak(device)
    auto = choose_kernel(device, torch.bfloat16, d, h)
    # both kernels where torch has the grouped one (on a CPU it runs too, slowly: toy size only);
    # the first is the one the profiles and worst_ratio_to_dense use
    kernels = ["grouped", "blocked"] if device.type == "cuda" else ["blocked", "grouped"]
    if not grouped_mm_available():
        kernels = ["blocked"]
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for spec in parse_experts(",".join(sizes.speed_experts)):
        k = K_PRIMARY * K_SECONDARY if spec.hierarchical else 4
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
            tokens = math.ceil(m * spec.num_experts / k)
            row = {
                "experts": spec.config,
                "tokens": tokens,
                "tokens_per_expert": m,
                "auto_picks": choose_kernel(device, torch.bfloat16, d, h, spec.num_experts),
            }
            try:
                x = torch.randn(tokens, d, device=device)
                dense_s = time_steps(
                    _layer_step(dense, x, False), device, warmup=sizes.warmup, reps=sizes.reps
                )["median_s"]
                for kernel in kernels:
                    with expert_kernel(kernel):
                        moe_s = time_steps(
                            _layer_step(moe, x, True),
                            device,
                            warmup=sizes.warmup,
                            reps=sizes.reps,
                        )["median_s"]
                    shape = (tokens, d, h, k, gate_outputs(spec))
                    rows.append(_speed_row(row, kernel, moe_s, dense_s, shape, peak, device))
                if spec.config in sizes.profile_experts and m == max(sizes.speed_tokens_per_expert):
                    with expert_kernel(kernels[0]):
                        name = f"{spec.config} at {m} tokens per expert, {kernels[0]}"
                        profiles[name] = profile_step(_layer_step(moe, x, True), device)
                del x
            except Exception as err:
                if not is_oom(err):
                    raise
                rows.append({**row, "status": "out of memory"})
                free_memory(device)
        del moe, dense
    best = [r for r in rows if r.get("kernel") == kernels[0]]
    return {
        "d_model": d,
        "d_hidden": h,
        "auto_kernel": auto,
        "peak_tflops": None if peak is None else peak / 1e12,
        "worst_ratio_to_dense": max((r["ratio_to_dense"] for r in best), default=None),
        "rows": rows,
        **{f"profile: {name}": table for name, table in profiles.items()},
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
) -> dict:
    """Seconds per training step of the language model `cfg` (forward, backward, clipping, the
    optimizers training builds from `train`) on random tokens of its vocabulary, in train.dtype;
    with `micro_batches` the step's rows go through in that many forward and backward passes
    before the one update, as the trainer accumulates them (moe_impl/train/micro.py)."""
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

    result: dict[str, Any] = time_steps(step, device, warmup=warmup, reps=reps)
    result["peak_gib"] = peak_gib(device)
    return result


def lm_step_speed(device: torch.device, sizes: Sizes) -> dict:
    """The training step of each preset on random tokens of its own vocabulary (sampled softmax
    as the preset sets it), bf16 autocast, Adam / factored Adam as training builds them."""
    peak = bf16_peak(device)
    tokens = sizes.lm_batch * sizes.lm_seq
    train = TrainSection(lr=1e-4, dtype="bfloat16")
    rows = []
    for name in sizes.lm_presets:
        cfg = ALL_PRESETS[name]
        paper = PAPER_VALUES.get("lm1b/" + name.split("/", 1)[1])
        row = {
            "preset": name,
            "batch": sizes.lm_batch,
            "seq_len": sizes.lm_seq,
            "params_b": flops.total_params(cfg) / 1e9,
        }
        try:
            timed = time_lm_step(
                cfg,
                train,
                device,
                batch=sizes.lm_batch,
                seq_len=sizes.lm_seq,
                warmup=2,
                reps=sizes.lm_reps,
            )
        except Exception as err:
            if not is_oom(err):
                raise
            rows.append({**row, "status": "out of memory"})
            continue
        step_s = timed["median_s"]
        tflops = flops.train_flops_per_token(cfg) * tokens / step_s / 1e12
        rows.append(
            {
                **row,
                "step_ms": 1e3 * step_s,
                "tokens_per_s": tokens / step_s,
                "tflops_per_gpu": tflops,
                "mfu": telemetry.mfu(tflops, peak),
                "peak_gib": timed["peak_gib"],
                "paper_tflops_per_gpu": None if paper is None else paper.tflops_per_gpu,
            }
        )
    return {
        "tokens_per_step": tokens,
        "paper_column": "Table 7 TFLOPS/GPU: 16 or 32 K40s, float32; ours: one GPU, bf16",
        "rows": rows,
    }
