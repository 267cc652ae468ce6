"""`python -m moe_impl bench --peers` (moe_impl/bench/peers.py): the peers' layers at toy size, their
rows in the table, JSON and figure, and the rows that say why a peer did not run. The peers are the
`peers` extra (`pip install -e .[peers]`); without them these tests skip, except under
MOE_REQUIRE_PEERS=1, which .ci/run sets after installing the extra. No timing assertions."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from moe_impl.bench import peers, worker
from moe_impl.bench import plot as bench_plot
from moe_impl.bench.spec import parse_experts
from moe_impl.cli import bench, main

CPU_PEERS = [name for name, peer in peers.PEERS.items() if not peer.cuda_only]
EXTRA = ["mixture-of-experts", "st-moe-pytorch"]  # what the `peers` extra installs


def require(name: str) -> None:
    """Skip without peer `name`, unless CI requires the extra (MOE_REQUIRE_PEERS)."""
    if importlib.util.find_spec(peers.PEERS[name].module) is not None:
        return
    if os.environ.get("MOE_REQUIRE_PEERS") and name in EXTRA:
        pytest.fail(f"{name} is not installed but MOE_REQUIRE_PEERS is set")
    pytest.skip(f"{name} is not installed ({peers.PEERS[name].install})")


def test_parse_peers():
    assert peers.parse_peers(None) == []
    assert peers.parse_peers("all") == list(peers.PEERS)
    assert peers.parse_peers("st-moe-pytorch, mixture-of-experts") == [
        "st-moe-pytorch",
        "mixture-of-experts",
    ]
    with pytest.raises(ValueError, match="unknown peer 'x'"):
        peers.parse_peers("mixture-of-experts,x")


def test_unavailable_names_the_reason(monkeypatch):
    assert peers.unavailable("megablocks", "cpu") == "CUDA only"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert peers.unavailable("mixture-of-experts", "cpu").startswith("not installed (pip install")


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("entry", ["8", "16-h"])
def test_peer_layer_runs_forward_and_backward_at_toy_size(name, entry):
    require(name)
    torch.manual_seed(0)
    spec = parse_experts(entry)[0]
    built = peers.build(name, spec, 16, 32, 4)
    assert built.k == peers.PEERS[name].k(spec, 4)
    x = torch.randn(64, 16, requires_grad=True)
    y, aux, stats = built.forward(x)
    assert y.shape == x.shape and aux.dim() == 0 and stats is None
    (y.square().mean() + aux).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    expert_weights = sum(p.numel() for p in built.module.parameters() if p.dim() >= 2)
    assert expert_weights >= spec.num_experts * 2 * 16 * 32  # every expert d -> h -> d
    text = peers.PEERS[name].describe(spec, 4)
    assert f"top-{built.k}" in text and ("flat" in text or not spec.hierarchical or "Heir" in text)


def test_ours_through_the_same_interface_reports_stats():
    spec = parse_experts("16-h")[0]
    built = peers.build(peers.OURS, spec, 16, 32, 4)
    y, _, stats = built.forward(torch.randn(64, 16))
    assert built.k == 4 and y.shape == (64, 16) and stats.tokens_per_expert.numel() == 16


def test_a_peer_that_cannot_import_is_a_skipped_row(tmp_path, monkeypatch):
    def broken(*args):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(peers, "build", broken)
    cfg = tmp_path / "cfg.json"
    row = bench.make_row(parse_experts("4")[0], _args(), "torchtitan")
    cfg.write_text(json.dumps({**row, "device": "cpu", "max_seconds": 60.0}))
    assert worker.run_worker(str(cfg), str(tmp_path / "out.json")) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result == {"status": "skipped", "reason": "cannot import: No module named 'triton'"}


def _args(**kw):
    argv = ["bench", "--experts", "4", "--tokens", "64", *kw.pop("argv", [])]
    parser = bench.argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_peer_rows_carry_their_k_and_configuration():
    args = _args(argv=["--peers"])
    spec = parse_experts("64-h")[0]
    row = bench.make_row(spec, args, "mixture-of-experts")
    assert row["implementation"] == "mixture-of-experts" and row["k"] == 2
    assert row["tokens_per_expert"] == 64 * 2 / 64
    assert "HeirarchicalMoE 8x8, top-2" in row["peer_config"]
    assert math.isnan(row["est_mem_mb"]) and math.isnan(row["params"])
    ours = bench.make_row(spec, args)
    assert ours["implementation"] == "moe_impl" and ours["k"] == 4 and ours["peer_config"] == ""
    assert bench.too_large(row, "cpu", peers_max_experts=32) == (
        "peer above --peers-max-experts=32"
    )
    assert bench.too_large(row, "cpu", peers_max_experts=64) is None


def test_table_and_plot_show_peers_beside_ours():
    args = _args()
    rows = []
    for entry in ("4", "16-h"):
        for impl in ("moe_impl", "st-moe-pytorch"):
            row = bench.make_row(parse_experts(entry)[0], args, impl)
            row.update(dict.fromkeys(bench.MEASURED, 2.0), status="ok")
            rows.append(row)
    rows[-1].update(dict.fromkeys(bench.MEASURED, math.nan), status="skipped", reason="RSS")
    table = bench_plot.format_table(rows)
    assert "skipped: 16-h st-moe-pytorch (hierarchical): RSS" in table
    assert "st-moe-pytorch (hierarchical): MoE top-4, flat (no hierarchy)" in table
    fig = bench_plot.plot_bench(rows)
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert "st-moe-pytorch (flat)" in labels and "st-moe-pytorch (hierarchical)" not in labels


@pytest.mark.integration
def test_bench_peers_end_to_end_at_toy_size(tmp_path, capsys):
    for name in EXTRA:
        require(name)
    argv = ["bench", "--experts", "4,16-h", "--tokens", "128", "--d-model", "16"]
    argv += ["--d-hidden", "32", "--reps", "1", "--warmup", "0", "--threads", "1", "--peers"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())
    impls = [r["implementation"] for r in rows]
    installed = [n for n in peers.PEERS if peers.unavailable(n, "cpu") is None]
    assert impls == ["moe_impl", *installed] * 2
    for row in rows:
        if row["implementation"] in EXTRA or row["implementation"] == "moe_impl":
            assert row["status"] == "ok", row["reason"]
            assert row["ratio_median"] > 0 and row["params"] > 0 and row["peak_mem_mb"] > 0
            assert row["ratio_median"] == pytest.approx(
                row["moe_ms_median"] / row["dense_ms_median"]
            )
    by = {(r["config"], r["implementation"]): r for r in rows}
    assert by[("4", "mixture-of-experts")]["k"] == 2 and by[("4", "st-moe-pytorch")]["k"] == 4
    assert by[("4", "moe_impl")]["cv_load"] is not None
    assert by[("4", "st-moe-pytorch")]["cv_load"] is None  # a peer reports no routing stats
    assert "peer megablocks: CUDA only" in out
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_one_default_for_the_peers_largest_expert_count():
    """bench --peers-max-experts and the workflow's bench.peers_max_experts share one default."""
    import yaml

    from moe_impl.bench.spec import PEERS_MAX_EXPERTS
    from moe_impl.cli.bench import add_parser

    root = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    bench_schema = schema["properties"]["bench"]["properties"]["peers_max_experts"]
    assert bench_schema["default"] == PEERS_MAX_EXPERTS
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["bench"]).peers_max_experts == PEERS_MAX_EXPERTS
