"""How large each section runs: the full check (one GPU, under 8 minutes on an H200) and `--quick`
(the same code at toy size, seconds on a CPU; the test suite runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the paper's 1-Billion-Word MoE models that fit one GPU (Table 7), smallest to largest
LM1B_ONE_GPU = (
    "lm1b/MoE-4",
    "lm1b/MoE-32",
    "lm1b/MoE-256",
    "lm1b/MoE-256-h",
    "lm1b/MoE-1024-h",
    "lm1b/MoE-4096-h",
)


@dataclass(frozen=True, kw_only=True)
class Sizes:
    # exactness: small layers against the CPU float64 reference
    exact_d: int = 32
    exact_h: int = 64
    exact_tokens: int = 256
    exact_experts: int = 16  # flat, k = 4
    exact_groups: tuple[int, int] = (4, 8)  # hierarchical a x b, k = 2 + 2
    # the two expert kernels compared on the device (bf16)
    kernel_d: int = 512
    kernel_h: int = 1024
    kernel_tokens: int = 4096
    kernel_experts: int = 256
    kernel_groups: tuple[int, int] = (16, 16)
    # 131072 experts (a x b = 256 x 512): forward + backward with sparse expert gradients
    scale_groups: tuple[int, int] = (256, 512)
    scale_d: int = 64
    scale_h: int = 128
    scale_tokens: int = 16384
    # the layer against a FLOP-matched dense FFN (bench.spec entries), bf16
    speed_experts: tuple[str, ...] = ("4", "32", "256", "256-h", "1024-h", "4096-h")
    speed_d: int = 512  # the paper's expert shape (App. C.1)
    speed_h: int = 1024
    speed_tokens_per_expert: tuple[int, ...] = (256, 1024)
    profile_experts: tuple[str, ...] = ("256", "4096-h")  # where one step's time goes
    # also timed (and profiled) with the routing compiled (MoELayer.compile_routing), at the
    # largest tokens per expert with the first kernel (each size adds its compile time)
    compile_experts: tuple[str, ...] = ("256", "4096-h")
    # torch.compile's arguments there; {} = its defaults (inductor, mode default)
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup: int = 3
    reps: int = 10
    # the language models' training step
    lm_presets: tuple[str, ...] = LM1B_ONE_GPU
    lm_batch: int = 1024  # x lm_seq = 262,144 positions: the paper's step of ~300K words (§3.1)
    lm_seq: int = 256
    lm_reps: int = 5
    lm_compile_presets: tuple[str, ...] = ("lm1b/MoE-256-h",)  # also timed compiled
    # the real trainer, about a minute
    trainer_preset: str = "cpu/MoE-256-h"
    trainer_batch: int = 128
    trainer_seq: int = 64
    trainer_steps: int = 1500
    trainer_eval_tokens: int = 50_000
    trainer_timeout_s: float = 180.0
    # expert parallelism through NCCL, one process
    nccl_experts: str = "16,16-h"
    nccl_tokens: int = 4096
    # the one-GPU reproduction: timed steps of each model
    workflow_config: str = "config/gpu.yaml"
    workflow_steps: int = 10
    workflow_warmup: int = 2


FULL = Sizes()
QUICK = Sizes(
    exact_tokens=64,
    kernel_d=16,
    kernel_h=32,
    kernel_tokens=256,
    kernel_experts=16,
    kernel_groups=(4, 4),
    scale_d=8,
    scale_h=8,
    scale_tokens=512,
    speed_experts=("4", "16-h"),
    speed_d=16,
    speed_h=32,
    speed_tokens_per_expert=(8, 32),
    profile_experts=("16-h",),
    compile_experts=("16-h",),
    # the compiled path's code at toy size without inductor's C++ build (tens of seconds)
    compile_kwargs={"backend": "aot_eager"},
    warmup=1,
    reps=2,
    lm_presets=("cpu/MoE-4", "cpu/MoE-256-h"),
    lm_batch=4,
    lm_seq=16,
    lm_reps=2,
    lm_compile_presets=("cpu/MoE-4",),
    trainer_preset="cpu/MoE-4",
    trainer_batch=8,
    trainer_seq=16,
    trainer_steps=20,
    trainer_eval_tokens=2000,
    trainer_timeout_s=180.0,
    nccl_experts="4",
    nccl_tokens=64,
    workflow_config="config/smoke.yaml",
    workflow_steps=2,
    workflow_warmup=1,
)
