"""The environment section: versions, the device, its memory (NVML), the peak used for MFU and
where it came from, and a measured bf16 matmul rate beside that peak."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

import torch

from moe_impl import telemetry
from moe_impl.gpucheck.timing import sync
from moe_impl.runs import runinfo
from moe_impl.telemetry.nvml import _load_nvml, _nvml_handle, _text


def nvml_facts(device: torch.device) -> dict:
    """Driver, memory and power limit from NVML, or why they are missing."""
    if device.type != "cuda":
        return {"nvml": "not applicable on cpu"}
    nvml = _load_nvml()
    if nvml is None:
        return {"nvml": "unavailable (nvidia-ml-py missing or no driver)"}
    handle = _nvml_handle(nvml, device.index or 0)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    facts = {
        "nvml": "ok",
        "driver": _text(nvml.nvmlSystemGetDriverVersion()),
        "nvml_name": _text(nvml.nvmlDeviceGetName(handle)),
        "memory_total_gib": memory.total / 2**30,
        "memory_used_gib": memory.used / 2**30,
    }
    try:
        facts["power_limit_w"] = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
    except Exception:
        facts["power_limit_w"] = None
    return facts


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul on random data (mean of `reps` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def check_environment(device: torch.device, quick: bool) -> dict:
    name = runinfo.device_name(str(device))
    peak, source = telemetry.resolve_peak_flops(str(device), "bfloat16", device_name=name)
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": name,
        "has_grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            multiprocessors=props.multi_processor_count,
            torch_memory_gib=props.total_memory / 2**30,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    facts.update(nvml_facts(device))
    n = 512 if quick else 8192
    measured = matmul_rate(device, n, torch.bfloat16)
    facts.update(
        peak_bf16_tflops=None if peak is None else peak / 1e12,
        peak_source=source,
        measured_bf16_matmul_tflops=measured / 1e12,
        measured_matmul_n=n,
        measured_over_peak=None if peak is None else measured / peak,
    )
    return {"facts": facts}
