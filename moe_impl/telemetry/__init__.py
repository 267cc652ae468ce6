"""Hardware telemetry: device peak FLOP/s and MFU (peak.py), and NVML sampling of GPUs (nvml.py).
Torch is imported only inside the functions that measure a CPU."""

from moe_impl.telemetry.nvml import GpuSampler
from moe_impl.telemetry.peak import (
    PEAK_TABLE,
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
