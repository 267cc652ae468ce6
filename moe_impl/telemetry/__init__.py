"""Hardware telemetry: device peak FLOP/s and MFU, NVML sampling of GPUs."""
