"""A background NVML sampler of one GPU: utilization, memory, power, clock, temperature, energy.

`GpuSampler` reads NVML (`nvidia-ml-py`, imported as `pynvml`) in a thread. Without pynvml, a
driver or a GPU it is inert: no exception, one debug line per process. No MLflow here (the
training loop logs what it reads).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_unavailable_logged = False


def _load_nvml(nvml=None):
    """pynvml after nvmlInit, or None (logged once per process at debug level)."""
    global _unavailable_logged
    try:
        if nvml is None:
            import pynvml as nvml  # type: ignore[no-redef]  # the module, where none was injected
        nvml.nvmlInit()
        return nvml
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound / DriverNotLoaded, ...
        if not _unavailable_logged:
            log.debug("GPU telemetry off (%s: %s)", type(err).__name__, err)
            _unavailable_logged = True
        return None


def _nvml_handle(nvml, cuda_index: int):
    """The NVML handle of CUDA device `cuda_index`.

    NOTE: NVML numbers physical GPUs; CUDA numbers the ones CUDA_VISIBLE_DEVICES lists
    (docs/tracking.md), so map through that list (indices or GPU-/MIG- UUIDs) when it is set.
    """
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [e for e in visible if e]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuSampler:
    """Samples one GPU every `interval_s` in a daemon thread; use as a context manager.

    Readings: utilization %, memory used MB, power W, SM clock MHz, temperature C; energy from
    the NVML energy counter where supported, else the integral of the power samples. `info` holds
    device_name, driver_version, memory_total_mb. Inert (`available` False, empty summary) when
    pynvml, the driver or the device is missing. `nvml` injects a stand-in module for tests.
    """

    def __init__(self, interval_s: float = 1.0, device_index: int = 0, *, nvml=None):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.device_index = device_index
        self.available = False
        self.info: dict[str, str | float] = {}
        self._nvml_module = nvml
        self._nvml: Any = None  # the pynvml module (or the stand-in) once started
        self._handle = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: dict[str, list[float]] = {}  # key -> [sum, max, count]
        self._latest: dict[str, float] = {}
        self._energy_start_mj: float | None = None
        self._energy_j: float | None = None
        self._power_j = 0.0  # trapezoid integral of the power samples
        self._last_power: tuple[float, float] | None = None  # (time, watts)
        self._t0 = self._t1 = 0.0

    def start(self) -> GpuSampler:
        nvml = _load_nvml(self._nvml_module)
        if nvml is None:
            return self
        try:
            self._handle = _nvml_handle(nvml, self.device_index)
        except Exception as err:  # no such device: inert, like the no-driver path
            log.debug("GPU telemetry off (device %d: %s)", self.device_index, err)
            nvml.nvmlShutdown()
            return self
        self._nvml, self.available = nvml, True
        h = self._handle
        self.info = {
            "device_name": self._query(lambda: _text(nvml.nvmlDeviceGetName(h)), "unknown"),
            "driver_version": self._query(lambda: _text(nvml.nvmlSystemGetDriverVersion()), ""),
            "memory_total_mb": self._query(
                lambda: nvml.nvmlDeviceGetMemoryInfo(h).total / 2**20, math.nan
            ),
        }
        self._energy_start_mj = self._query(
            lambda: float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)), None
        )
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self.available or self._nvml is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._t1 = time.monotonic()
        nvml, h = self._nvml, self._handle
        end_mj = self._query(lambda: float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)), None)
        if self._energy_start_mj is not None and end_mj is not None:
            self._energy_j = (end_mj - self._energy_start_mj) / 1000
            self.info["energy_source"] = "nvml-energy-counter"
        else:
            self._energy_j = self._power_j
            self.info["energy_source"] = "power-integral"
        self._query(nvml.nvmlShutdown, None)
        self._nvml = None

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _query(fn, default):
        # NOTE: any single query may be unsupported on a SKU or in MIG mode;
        # one failing reading must not stop the others, nor the run.
        try:
            return fn()
        except Exception:
            return default

    def _read(self) -> dict[str, float]:
        nvml, h, q = self._nvml, self._handle, self._query
        readings = {
            "gpu_utilization_pct": q(
                lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu), None
            ),
            "gpu_memory_used_mb": q(lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20, None),
            "gpu_power_w": q(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000, None),
            "gpu_sm_clock_mhz": q(
                lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)), None
            ),
            "gpu_temperature_c": q(
                lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)), None
            ),
        }
        return {k: v for k, v in readings.items() if v is not None}

    def _sample(self) -> None:
        readings, now = self._read(), time.monotonic()
        with self._lock:
            self._latest = readings
            for key, value in readings.items():
                s = self._stats.setdefault(key, [0.0, -math.inf, 0])
                s[0], s[1], s[2] = s[0] + value, max(s[1], value), s[2] + 1
            if "gpu_power_w" in readings:
                if self._last_power is not None:
                    t, w = self._last_power
                    self._power_j += (now - t) * (w + readings["gpu_power_w"]) / 2
                self._last_power = (now, readings["gpu_power_w"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def latest(self) -> dict[str, float]:
        """The most recent readings (empty when inert), e.g. to log with the current step."""
        with self._lock:
            return dict(self._latest)

    def summary(self) -> dict[str, float]:
        """{key_mean, key_max} per reading, gpu_energy_j, gpu_samples; empty when inert."""
        with self._lock:
            out: dict[str, float] = {}
            for key, (total, peak, count) in self._stats.items():
                out[f"{key}_mean"] = total / count
                out[f"{key}_max"] = peak
            if not self._stats:
                return out
            out["gpu_samples"] = float(max(s[2] for s in self._stats.values()))
            energy = self._energy_j if self._energy_j is not None else self._power_j
            if self._energy_start_mj is not None and self._nvml is not None:
                # still running: read the counter now
                now_mj = self._query(
                    lambda: float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)),
                    None,
                )
                if now_mj is not None:
                    energy = (now_mj - self._energy_start_mj) / 1000
            out["gpu_energy_j"] = energy
            return out
