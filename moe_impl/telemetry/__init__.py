"""Hardware telemetry: device peak FLOP/s and MFU, and NVML sampling of GPUs. Torch is imported
only inside the functions that measure a CPU."""

from moe_impl.telemetry.core import (
    PEAK_TABLE,
    GpuSampler,
    cpu_peak_flops,
    find_device,
    mfu,
    peak_flops,
    resolve_peak_flops,
)

__all__ = [
    "PEAK_TABLE",
    "GpuSampler",
    "cpu_peak_flops",
    "find_device",
    "mfu",
    "peak_flops",
    "resolve_peak_flops",
]
