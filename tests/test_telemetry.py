"""moe_impl.telemetry: the peak-FLOPS table, MFU, the measured CPU peak (peak.py) and the NVML
sampler (nvml.py).

The sampler is tested through the no-driver path (real pynvml on a GPU-less host, and a stand-in
whose nvmlInit fails) and through a stand-in NVML module that plays a GPU.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import pytest

from moe_impl.telemetry import GpuSampler, mfu, peak, peak_flops
from moe_impl.telemetry import nvml as telemetry_nvml


def _real_nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


_PEAK_CASES = [  # (device name as drivers report it, dtype, peak FLOP/s, table label)
    ("NVIDIA H200", "bf16", 989.4e12, "NVIDIA H200"),
    ("NVIDIA H200 NVL", "bfloat16", 835.5e12, "NVIDIA H200 NVL"),
    ("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989.4e12, "NVIDIA H100"),
    ("NVIDIA H100 PCIe", "fp16", 756.5e12, "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "bf16", 835.5e12, "NVIDIA H100 NVL"),
    ("NVIDIA H100 80GB HBM3", "float32", 67e12, "NVIDIA H100"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12, "NVIDIA A100"),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156e12, "NVIDIA A100"),
    ("NVIDIA A10", "bf16", 125e12, "NVIDIA A10"),
    ("NVIDIA L40S", "bf16", 362.05e12, "NVIDIA L40S"),
    ("NVIDIA L40", "bf16", 181.05e12, "NVIDIA L40"),
    ("NVIDIA L4", "bf16", 121e12, "NVIDIA L4"),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12, "NVIDIA V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "fp16", 112e12, "NVIDIA V100 PCIe"),
    ("Tesla T4", "fp16", 65e12, "NVIDIA T4"),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12, "NVIDIA GeForce RTX 4090"),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", 80e12, "NVIDIA GeForce RTX 3090 Ti"),
    ("NVIDIA GeForce RTX 3090", "bf16", 71e12, "NVIDIA GeForce RTX 3090"),
    ("Tesla K80", "fp32", 4.37e12, "NVIDIA Tesla K80"),
    ("Tesla K40m", "float32", 4.29e12, "NVIDIA Tesla K40"),
    ("AMD Instinct MI300X", "bf16", 1307.4e12, "AMD Instinct MI300X"),
]


@pytest.mark.parametrize(("name", "dtype", "peak", "label"), _PEAK_CASES)
def test_peak_table_most_specific_match(name, dtype, peak, label):
    assert peak_flops(name, dtype) == (pytest.approx(peak), f"table:{label}")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("NVIDIA A10G", "bf16"),  # not the A10: no guess
        ("Intel(R) Xeon(R) Processor", "fp32"),
        ("cpu", "bf16"),
        ("Tesla T4", "bf16"),  # known device, no bf16 support
        ("Tesla K80", "fp16"),
    ],
)
def test_peak_unknown_is_none(name, dtype):
    assert peak_flops(name, dtype) == (None, "unknown")


def test_every_table_label_resolves_to_its_own_entry():
    # an earlier, less specific entry would shadow a later one
    for entry in peak.PEAK_TABLE:
        assert peak.find_device(entry.label) is entry, entry.label


def test_peak_override_and_bad_inputs():
    assert peak_flops("anything", "bf16", override=1e15) == (1e15, "config")
    with pytest.raises(ValueError, match="int8"):
        peak_flops("NVIDIA H200", "int8")
    with pytest.raises(ValueError, match="override"):
        peak_flops("NVIDIA H200", "bf16", override=0)


def test_mfu_nan_when_peak_unknown():
    assert math.isnan(mfu(100.0, None))
    assert math.isnan(mfu(None, 1e15))
    assert mfu(494.7, 989.4e12) == pytest.approx(0.5)


def test_cpu_peak_flops_is_a_plausible_rate_measured_once(monkeypatch):
    import torch

    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: shapes.append(a.shape) or real_mm(a, b))
    peak._cpu_gemm_rate.cache_clear()
    rate = peak.cpu_peak_flops("float32", seconds=0.05)
    n = shapes[0][0]
    assert len(shapes) >= 2 and set(shapes) == {(n, n)}  # a warm-up, then timed n x n GEMMs
    # 0.1 GFLOP/s (any CPU of this century) .. 1 PFLOP/s (no CPU); a GEMM is 2·n³ FLOPs
    assert 1e8 < rate < 1e15
    calls = len(shapes)
    assert peak.cpu_peak_flops("fp32", seconds=0.05) == rate  # an alias: the same measurement
    assert len(shapes) == calls  # cached: no GEMM ran again
    peak._cpu_gemm_rate.cache_clear()


def test_resolve_peak_flops_measures_cpu_and_looks_gpus_up(monkeypatch):
    measured = []
    monkeypatch.setattr(peak, "cpu_peak_flops", lambda dtype: measured.append(dtype) or 3e10)
    assert peak.resolve_peak_flops("cpu", "bfloat16") == (3e10, "measured:cpu-gemm")
    assert measured == ["bfloat16"]
    assert peak.resolve_peak_flops("cuda", "bf16", device_name="NVIDIA L4") == (
        pytest.approx(121e12),
        "table:NVIDIA L4",
    )
    assert peak.resolve_peak_flops("cpu", "bf16", override=2e11) == (2e11, "config")
    assert measured == ["bfloat16"]  # an override is not measured


class _NoDriver:
    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("Driver Not Loaded")


def _assert_inert(sampler: GpuSampler):
    assert not sampler.available
    assert sampler.summary() == {} and sampler.latest() == {} and sampler.info == {}


@pytest.mark.parametrize("nvml", ["real", "stand-in"])
def test_gpu_sampler_inert_without_driver(nvml, monkeypatch, caplog):
    if nvml == "real" and _real_nvml_works():
        pytest.skip("this host has a working NVML driver")
    monkeypatch.setattr(telemetry_nvml, "_unavailable_logged", False)
    caplog.set_level(logging.DEBUG, logger=telemetry_nvml.log.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with GpuSampler(0.01, nvml=None if nvml == "real" else _NoDriver()) as sampler:
                time.sleep(0.03)
            _assert_inert(sampler)
    assert caught == []
    records = [r for r in caplog.records if r.name == "moe_impl.telemetry.nvml"]
    assert len(records) == 1 and records[0].levelno <= logging.INFO


class _FakeNvml:
    """Plays one GPU: power 100 W -> 300 W, an energy counter, a failing temperature query."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, energy_counter: bool = True):
        self.energy_counter = energy_counter
        self.calls = 0
        self.handles: list = []
        self.shutdowns = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self.handles.append(("index", i))
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(("uuid", uuid))
        return uuid

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlSystemGetDriverVersion(self):
        return "570.1"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"total": 141 * 2**30, "used": 2**30})()

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("Util", (), {"gpu": 50})()

    def nvmlDeviceGetPowerUsage(self, h):
        self.calls += 1
        return 100_000 if self.calls == 1 else 300_000  # mW

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1980

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_counter:
            raise self.NVMLError("Not Supported")
        return 1_000_000 + 5_000 * self.calls  # mJ


def test_gpu_sampler_readings_and_energy_counter():
    fake = _FakeNvml()
    with GpuSampler(0.01, nvml=fake) as sampler:
        time.sleep(0.1)
        assert sampler.latest()["gpu_sm_clock_mhz"] == 1980
    s = sampler.summary()
    assert sampler.available and fake.shutdowns == 1
    assert sampler.info["device_name"] == "NVIDIA H200"
    assert sampler.info["memory_total_mb"] == 141 * 1024
    assert sampler.info["energy_source"] == "nvml-energy-counter"
    assert s["gpu_power_w_max"] == 300 and 100 < s["gpu_power_w_mean"] < 300
    assert s["gpu_utilization_pct_mean"] == 50 and s["gpu_memory_used_mb_max"] == 1024
    assert "gpu_temperature_c_mean" not in s  # unsupported query skipped, others kept
    assert s["gpu_samples"] >= 3
    assert s["gpu_energy_j"] == pytest.approx(5 * fake.calls)  # 5 J per power read


def test_gpu_sampler_energy_from_power_without_counter():
    with GpuSampler(0.01, nvml=_FakeNvml(energy_counter=False)) as sampler:
        time.sleep(0.05)
    assert sampler.info["energy_source"] == "power-integral"
    assert sampler.summary()["gpu_energy_j"] > 0


def test_gpu_sampler_maps_cuda_visible_devices(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with GpuSampler(1.0, device_index=1, nvml=fake):
        pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    with GpuSampler(1.0, device_index=0, nvml=fake):
        pass
    assert fake.handles == [("index", 1), ("uuid", "GPU-abc")]
