"""gpu-check's speed sections on the CPU (issue 29, item 5): the profile table's shares add up to
the step (each unit of time counted once, on a constructed event list), layer_speed computes the
input gradient and reports the eager and the compiled path (lm_step's compiled row: the quick check
in tests/test_gpu_check.py). Timings are never asserted."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moe_impl.gpucheck import profile, speed
from moe_impl.gpucheck.sizes import QUICK

CPU = torch.device("cpu")


def _event(key, on, us, count=1, annotation=False):
    """A key_averages() entry: `on` the device type's name, `us` its self time there."""
    return SimpleNamespace(
        key=key,
        count=count,
        device_type=SimpleNamespace(name=on),
        self_device_time_total=us if on == "CUDA" else 0,
        self_cpu_time_total=us if on == "CPU" else 0,
        is_user_annotation=annotation,
    )


# one CUDA step of 1000 µs: aten::mm launched a 300 µs kernel (the op's own "self device time"
# repeats it: 300 more, which the old table counted a second time), a copy kernel, a memcpy, an
# annotation spanning the step, and the CPU ops' self times
_CUDA_EVENTS = [
    SimpleNamespace(**{**vars(_event("aten::mm", "CPU", 40)), "self_device_time_total": 300}),
    _event("sm90_gemm_kernel", "CUDA", 300),
    _event("elementwise_copy", "CUDA", 150, count=2),
    _event("Memcpy DtoD", "CUDA", 50),
    _event("ProfilerStep#1", "CUDA", 1000, annotation=True),
    _event("aten::copy_", "CPU", 30, count=2),
]


def test_cuda_shares_count_each_kernel_once_and_add_up_to_the_step():
    table = profile.share_table(_CUDA_EVENTS, step_us=1000, steps=1, cuda=True, rows=2)
    ops = [r["op"] for r in table]
    assert ops == ["sm90_gemm_kernel", "elementwise_copy", profile.OTHER, profile.UNCOVERED]
    assert [r["share"] for r in table] == pytest.approx([0.3, 0.15, 0.05, 0.5])
    assert sum(r["share"] for r in table) == pytest.approx(1.0)
    assert table[1]["calls_per_step"] == 2 and table[0]["ms_per_step"] == pytest.approx(0.3)


def test_cpu_shares_are_self_times_over_steps():
    table = profile.share_table(_CUDA_EVENTS, step_us=50, steps=2, cuda=False)
    assert [r["op"] for r in table[:2]] == ["aten::mm", "aten::copy_"]
    assert table[0]["ms_per_step"] == pytest.approx(0.02) and table[1]["calls_per_step"] == 1
    assert table[-1]["ms_per_step"] == pytest.approx(0.015)  # 100 µs of steps, 70 in ops
    assert sum(r["share"] for r in table) == pytest.approx(1.0)


def test_overlapping_kernels_leave_no_negative_remainder():
    events = [_event("a", "CUDA", 800), _event("b", "CUDA", 700)]  # two streams, one 1 ms step
    table = profile.share_table(events, step_us=1000, steps=1, cuda=True)
    assert table[-1]["share"] == 0.0


_TINY = replace(
    QUICK, speed_experts=("8-h",), speed_tokens_per_expert=(8,), profile_experts=("8-h",)
)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.integration)])
def test_layer_speed_takes_the_input_gradient_and_reports_both_paths(monkeypatch, compiled):
    seen = []
    real = speed._layer_step

    def spy(layer, x, is_moe):
        seen.append(x.requires_grad)
        return real(layer, x, is_moe)

    monkeypatch.setattr(speed, "_layer_step", spy)
    sizes = replace(_TINY, compile_experts=("8-h",) if compiled else ())
    if not compiled:  # the input-gradient flag alone: no build, no profile
        sizes = replace(sizes, profile_experts=())
    results = speed.layer_speed(CPU, sizes)
    assert seen and all(seen)
    rows = results["rows"]
    assert [r["routing"] for r in rows if r["kernel"] == rows[0]["kernel"]] == (
        ["eager", "compiled"] if compiled else ["eager"]
    )
    # the step with the expert weights cast in every forward, beside the kept bf16 copies'
    assert rows[0]["weights_cast_ms"] > 0
    assert all("weights_cast_ms" not in r for r in rows[1:])
    assert results["profile_rule"] == profile.PROFILE_RULE
    if compiled:
        assert rows[1]["compile_s"] >= 0
        for path in ("eager", "compiled"):
            table = results[f"profile: 8-h at 8 tokens per expert, {rows[0]['kernel']}, {path}"]
            assert sum(r["share"] for r in table) == pytest.approx(1.0)


def test_layer_speed_goes_on_past_a_layer_that_cannot_be_built(monkeypatch):
    real = speed.build_moe

    def build(spec, *args):
        if spec.config == "8-h":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(spec, *args)

    monkeypatch.setattr(speed, "build_moe", build)
    sizes = replace(_TINY, speed_experts=("8-h", "4"), profile_experts=(), compile_experts=())
    results = speed.layer_speed(CPU, sizes)
    rows = results["rows"]
    assert rows[0] == {"experts": "8-h", "status": "out of memory building the layer"}
    # the k = E layer: the blocked and grouped kernels and the wide FFN, auto's pick first
    assert [r["kernel"] for r in rows[1:]] == ["blocked", "grouped", "wide"]
    assert {r["auto_picks"] for r in rows[1:]} == {"blocked"}
    assert results["worst_ratio_to_dense"] == rows[1]["ratio_to_dense"]
