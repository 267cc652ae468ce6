"""`python -m moe_impl bench --distributed` with 2 spawned gloo processes: per-rank tokens per
expert and bytes sent against closed forms. No timing assertions."""

from __future__ import annotations

import json

import pytest

from moe_impl.cli import main

D_MODEL, TOKENS = 8, 200


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--distributed",
        "--world-size",
        "2",
        "--experts",
        "4,4x2-h",
        "--tokens",
        str(TOKENS),
        "--d-model",
        str(D_MODEL),
        "--d-hidden",
        "8",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return json.loads((out / "bench_distributed.json").read_text())


@pytest.mark.integration
def test_flat_traffic_matches_the_closed_form(rows):
    """4 experts, k = 4: every token visits all four, two on each rank. Per rank and step, 2·T rows
    leave in each of the four exchanges (x, y back, and their gradients) plus 2·T expert ids."""
    flat = [r for r in rows if r["config"] == "4"]
    assert [r["rank"] for r in flat] == [0, 1]
    for r in flat:
        off_rank = 2 * TOKENS
        assert r["mb_sent"] * 1e6 == pytest.approx(4 * off_rank * D_MODEL * 4 + off_rank * 8)
        assert r["mb_received"] == r["mb_sent"]
        assert r["local_experts"] == 2
        assert r["tokens_per_local_expert"] == 2 * TOKENS  # the global batch: 2 ranks x T
        assert r["slots_received"] == 4 * TOKENS
        assert r["step_ms"] >= r["comm_ms"] > 0 and r["compute_ms"] > 0
        assert set(r["comm_ms_by_kind"]) >= {"all_to_all", "counts", "all_reduce"}


@pytest.mark.integration
def test_hierarchical_rows_are_conserved(rows):
    """Every (token, expert) slot of the global batch runs on exactly one rank."""
    hier = [r for r in rows if r["config"] == "4x2-h"]
    assert sum(r["slots_received"] for r in hier) == 2 * TOKENS * 4
    assert all(r["local_experts"] == 4 and r["world_size"] == 2 for r in hier)
    assert all(r["backend"] == "gloo" for r in hier)


def test_bad_world_size_is_one_line(capsys):
    assert main(["bench", "--distributed", "--world-size", "1", "--experts", "4"]) == 2
    assert "--world-size must be >= 2" in capsys.readouterr().err


def test_k_above_the_experts_is_one_line_before_any_process_starts(capsys):
    assert main(["bench", "--distributed", "--experts", "4,3"]) == 2
    assert "--k=4 must be <= the experts of --experts entry '3'" in capsys.readouterr().err
