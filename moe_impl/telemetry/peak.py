"""Peak FLOP/s of a device and MFU: the one source for training (summary.json) and `bench`.

- `peak_flops` looks a device name up in a table of *dense* (no 2:4 sparsity) peaks, most
  specific name first (docs/tracking.md): NVML and torch have no call for it. An unknown device gives
  (None, "unknown") and MFU is then NaN, never a guess.
- `cpu_peak_flops` measures a GEMM on this machine so MFU on CPU means something.
- `resolve_peak_flops` picks one of them (or a configured override) for a run's device.
Torch is imported only inside the functions that measure a CPU. No MLflow here.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass

DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",  # fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32)
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


@dataclass(frozen=True)
class PeakEntry:
    label: str
    patterns: tuple[str, ...]  # regexes; all must match the lower-cased device name
    flops: dict[str, float]  # dtype -> dense peak FLOP/s of one device


def _tc(
    bf16: float | None, tf32: float | None, fp32: float | None, fp16: float | None = None
) -> dict:
    """Peak columns in TFLOP/s -> FLOP/s; fp16 defaults to the bf16 rate; None = unsupported."""
    cols = {"bf16": bf16, "fp16": bf16 if fp16 is None else fp16, "tf32": tf32, "fp32": fp32}
    return {k: v * 1e12 for k, v in cols.items() if v is not None}


# Dense peaks from the vendors' datasheets (sparse figures halved). "fp32" is the non-tensor
# FP32 rate (torch's default for float32 matmul); "tf32" applies when TF32 is allowed.
# NOTE: order matters, most specific first: "h100"+"pcie" before "h100", "l40s" before "l40"
# before "l4", "v100s" before "v100". Word boundaries keep "a10" from matching "a100" or "a10g".
PEAK_TABLE: tuple[PeakEntry, ...] = (
    PeakEntry("NVIDIA GB200", (r"\bgb200\b",), _tc(2500, None, None)),
    PeakEntry("NVIDIA B200", (r"\bb200\b",), _tc(2250, None, None)),
    PeakEntry("NVIDIA GH200", (r"\bgh200\b",), _tc(989.4, 494.7, 67)),
    PeakEntry("NVIDIA H200 NVL", (r"\bh200\b", r"\bnvl\b"), _tc(835.5, 417.5, 60)),
    PeakEntry("NVIDIA H200", (r"\bh200\b",), _tc(989.4, 494.7, 67)),
    PeakEntry("NVIDIA H100 NVL", (r"\bh100\b", r"\bnvl\b"), _tc(835.5, 417.5, 60)),
    PeakEntry("NVIDIA H100 PCIe", (r"\bh100\b", r"\bpcie\b"), _tc(756.5, 378, 51.2)),
    PeakEntry("NVIDIA H100", (r"\bh100\b",), _tc(989.4, 494.7, 67)),  # SXM
    PeakEntry("NVIDIA A100", (r"\ba100\b",), _tc(312, 156, 19.5)),  # SXM and PCIe
    PeakEntry("NVIDIA L40S", (r"\bl40s\b",), _tc(362.05, 183, 91.6)),
    PeakEntry("NVIDIA L40", (r"\bl40\b",), _tc(181.05, 90.5, 90.5)),
    PeakEntry("NVIDIA L4", (r"\bl4\b",), _tc(121, 60, 30.3)),
    PeakEntry("NVIDIA A40", (r"\ba40\b",), _tc(149.7, 74.8, 37.4)),
    PeakEntry("NVIDIA A30", (r"\ba30\b",), _tc(165, 82, 10.3)),
    PeakEntry("NVIDIA A10", (r"\ba10\b",), _tc(125, 62.5, 31.2)),
    PeakEntry("NVIDIA V100S PCIe", (r"\bv100s\b",), _tc(None, None, 16.4, fp16=130)),
    PeakEntry("NVIDIA V100 PCIe", (r"\bv100\b", r"\bpcie\b"), _tc(None, None, 14, fp16=112)),
    PeakEntry("NVIDIA V100 SXM2", (r"\bv100\b",), _tc(None, None, 15.7, fp16=125)),
    PeakEntry("NVIDIA T4", (r"\bt4\b",), _tc(None, None, 8.1, fp16=65)),
    # GeForce: tensor rates with fp32 accumulation (what torch uses), half the fp16-acc figure
    PeakEntry("NVIDIA GeForce RTX 4090", (r"\b4090\b",), _tc(165.2, 82.6, 82.6)),
    PeakEntry("NVIDIA GeForce RTX 3090 Ti", (r"\b3090\s*ti\b",), _tc(80, 40, 40)),
    PeakEntry("NVIDIA GeForce RTX 3090", (r"\b3090\b",), _tc(71, 35.6, 35.6)),
    # Kepler has no fast fp16; a K80 board is two devices, the figure is per device (boost).
    PeakEntry("NVIDIA Tesla K80", (r"\bk80\b",), _tc(None, None, 4.37)),
    PeakEntry("NVIDIA Tesla K40", (r"\bk40[cms]?\b",), _tc(None, None, 4.29)),  # base clock
    PeakEntry("AMD Instinct MI325X", (r"\bmi325x?\b",), _tc(1307.4, 653.7, 163.4)),
    PeakEntry("AMD Instinct MI300X", (r"\bmi300x\b",), _tc(1307.4, 653.7, 163.4)),
)


def normalize_dtype(dtype: str) -> str:
    """'bfloat16', 'torch.bfloat16', 'bf16' -> 'bf16'; ValueError for anything else."""
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[key]


def find_device(device_name: str) -> PeakEntry | None:
    """The first (most specific) table entry whose patterns all match the device name."""
    name = device_name.lower()
    for entry in PEAK_TABLE:
        if all(re.search(p, name) for p in entry.patterns):
            return entry
    return None


def peak_flops(
    device_name: str, dtype: str, *, override: float | None = None
) -> tuple[float | None, str]:
    """Dense peak FLOP/s of one device and where it came from.

    Returns (override, "config") when an override is given, (peak, "table:<label>") for a known
    device with that dtype, and (None, "unknown") otherwise: MFU is then NaN, never a guess.
    """
    dtype = normalize_dtype(dtype)
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak_flops override must be > 0 FLOP/s, got {override!r}")
        return float(override), "config"
    entry = find_device(device_name)
    if entry is None or dtype not in entry.flops:
        return None, "unknown"
    return entry.flops[dtype], f"table:{entry.label}"


@functools.lru_cache(maxsize=8)
def _cpu_gemm_rate(dtype: str, seconds: float, threads: int) -> float:
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    n = 2048 if threads >= 8 else 1024
    a = torch.randn(n, n).to(torch_dtype)
    b = torch.randn(n, n).to(torch_dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
        if t0 + dt >= deadline:
            return best


def cpu_peak_flops(dtype: str = "float32", seconds: float = 0.5) -> float:
    """Measured CPU peak FLOP/s: the best n x n GEMM rate over `seconds` on torch's threads.

    torch's intra-op threads are the ones a CPU run computes with (all physical cores by
    default). Tag the result "measured:cpu-gemm". Cached per (dtype, seconds, thread count).
    """
    import torch

    return _cpu_gemm_rate(normalize_dtype(dtype), float(seconds), torch.get_num_threads())


def resolve_peak_flops(
    device: str, dtype: str, *, device_name: str | None = None, override: float | None = None
) -> tuple[float | None, str]:
    """Peak for a run on `device` ("cpu", "cuda", "cuda:1"): config, else CPU GEMM, else table."""
    if override is not None:
        return peak_flops(device_name or "", dtype, override=override)
    if str(device).startswith("cpu"):
        return cpu_peak_flops(dtype), "measured:cpu-gemm"
    if device_name is None:
        from moe_impl.runs import runinfo

        device_name = runinfo.device_name(device)
    return peak_flops(device_name, dtype)


def mfu(tflops_per_device: float | None, peak: float | None) -> float:
    """Model FLOPs utilization = achieved FLOP/s / dense peak; NaN when either is unknown."""
    if tflops_per_device is None or peak is None or not peak > 0:
        return math.nan
    return float(tflops_per_device) * 1e12 / float(peak)
