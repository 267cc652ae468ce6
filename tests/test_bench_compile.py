"""`bench --compile`: the child compiles our layer's routing and reports the compile time; the
flag is checked and shown. The build runs on the aot_eager backend here (inductor's C++ build takes
tens of seconds on a CPU); timings are never asserted."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from helpers import NoWatchdog

from moe_impl.bench import plot as bench_plot
from moe_impl.bench import worker
from moe_impl.bench.spec import parse_experts
from moe_impl.cli import bench, main
from moe_impl.layer import compiled
from moe_impl.layer.base import MoELayer


def test_compile_seconds_is_the_warmup_beyond_the_median():
    assert worker.compile_seconds([5.0, 1.5, 0.9], [1.0, 1.2, 0.8]) == pytest.approx(4.5)
    assert math.isnan(worker.compile_seconds([], [1.0]))


@pytest.mark.parametrize("config", ["4", "16-h"])
def test_measure_with_compile_routes_through_the_compiled_functions(monkeypatch, config):
    monkeypatch.setitem(compiled.DEFAULTS, "backend", "aot_eager")
    monkeypatch.setattr(worker.threading, "Timer", NoWatchdog)
    seen = []
    original = MoELayer.compile_routing

    def spy(self, **kwargs):
        seen.append(type(self).__name__)
        return original(self, **kwargs)

    monkeypatch.setattr(MoELayer, "compile_routing", spy)
    calls = {"select": 0, "combine": 0}  # the timed steps go through the compiled functions
    for name in calls:
        method = getattr(compiled.CompiledRouting, name)

        def counted(self, *args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(compiled.CompiledRouting, name, counted)
    spec = parse_experts(config)[0]
    cfg = {
        **spec._asdict(),
        "d_model": 8,
        "d_hidden": 8,
        "k": 2,
        "tokens": 32,
        "seed": 0,
        "reps": 1,
        "warmup": 1,
        "optimizer": False,
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "max_seconds": 60.0,
        "compile": True,
    }
    row = worker.measure(cfg)
    assert seen == ["HierarchicalMoE" if spec.hierarchical else "MoE"]
    assert calls["select"] >= 2 and calls["combine"] >= 2  # warm-up and timed steps
    assert math.isfinite(row["compile_s"]) and row["compile_s"] >= 0
    before = dict(calls)
    assert math.isnan(worker.measure({**cfg, "compile": False})["compile_s"])
    assert calls == before  # the eager measurement never enters them


def test_compile_flag_goes_into_the_row_and_the_table_header():
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--compile", "--tokens", "64"])
    row = bench.make_row(parse_experts("4")[0], args)
    assert row["compile"] is True and math.isnan(row["compile_s"])
    row.update(status="ok", threads=1, peak_gflops=math.nan)
    assert "routing and combine compiled (--compile)" in bench_plot.format_table([row])
    plain = bench.make_row(parse_experts("4")[0], parser.parse_args(["bench"]))
    assert plain["compile"] is False


def test_compile_needs_a_warmup_step(capsys):
    assert main(["bench", "--experts", "4", "--compile", "--warmup", "0"]) == 2
    assert "--compile needs --warmup >= 1" in capsys.readouterr().err
