"""flops.py and presets.py against Tables 1, 7 and 8, closed forms on tiny dims, and the flops CLI."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re

import pytest

from moe_impl.cli import flops as flops_cli
from moe_impl.model import flops
from moe_impl.model.config import ModelConfig
from moe_impl.model.presets import (
    NEWS100B_VOCAB,
    PAPER_EXCEPTIONS,
    PAPER_VALUES,
    PRESETS,
    SOFTMAX_SAMPLES,
    TABLE1,
)

_COUNTS = {  # printed column -> (our count, unit)
    "params_M": (flops.params_excl_embedding_softmax, 1e6),
    "ops_M": (flops.ops_per_timestep, 1e6),
    "total_B": (flops.total_params, 1e9),
}


def _check_printed(table: str, preset: str, column: str, printed: str) -> None:
    """round(ours, printed decimals) == printed, unless PAPER_EXCEPTIONS explains the entry."""
    count, unit = _COUNTS[column]
    ours = count(PRESETS[preset]) / unit
    decimals = len(printed.partition(".")[2])
    kind, _ = PAPER_EXCEPTIONS.get((table, preset, column), ("rounded", ""))
    if kind == "rounded":
        assert round(ours, decimals) == float(printed), (preset, column, ours, printed)
        return
    assert round(ours, decimals) != float(printed), "listed as an exception but rounds fine"
    if kind == "truncated":
        assert math.floor(ours * 10**decimals) / 10**decimals == float(printed)
    else:  # "unexplained": one unit of the last printed digit away
        assert abs(round(ours, decimals) - float(printed)) <= 10**-decimals + 1e-9


def test_every_preset_has_paper_values():
    assert list(PAPER_VALUES) == list(PRESETS)
    assert {p for _, p, _ in PAPER_EXCEPTIONS} <= set(PRESETS)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("column", ["params_M", "ops_M"])
def test_tables_7_and_8_params_and_ops(preset, column):
    row = PAPER_VALUES[preset]
    _check_printed(row.source, preset, column, getattr(row, column))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("lm1b/")])
def test_table_7_total_params(preset):
    _check_printed("Table 7", preset, "total_B", PAPER_VALUES[preset].total_B)


@pytest.mark.parametrize("label", list(TABLE1))
def test_table_1(label):
    preset, params, ops = TABLE1[label]
    _check_printed("Table 1", preset, "params_M", params)
    _check_printed("Table 1", preset, "ops_M", ops)


def test_news100b_vocab_reproduces_table_8_totals():
    """The inferred vocabulary lies in the (documented) range that reproduces every Total."""
    news = {p: c for p, c in PRESETS.items() if p.startswith("news100b/")}

    def fits(vocab: int) -> bool:
        return all(
            round(flops.total_params(dataclasses.replace(c, vocab_size=vocab)) / 1e9, 1)
            == float(PAPER_VALUES[p].total_B)
            for p, c in news.items()
        )

    assert all(c.vocab_size == NEWS100B_VOCAB for c in news.values())
    assert fits(NEWS100B_VOCAB)
    assert fits(75_269) and fits(109_588)
    assert not fits(75_268) and not fits(109_589)


def test_moe_143m_group_shape_is_the_only_one_matching_table_7():
    cfg = PRESETS["lm1b/MoE-143M"]
    matching = []
    for a in (2**i for i in range(9)):
        b = 256 // a
        shaped = dataclasses.replace(
            cfg, num_groups=a, group_size=b, k_primary=min(2, a), k_secondary=min(2, b)
        )
        if (
            round(flops.params_excl_embedding_softmax(shaped) / 1e6, 1) == 4371.1
            and round(flops.ops_per_timestep(shaped) / 1e6, 1) == 142.7
        ):
            matching.append((a, b))
    assert matching == [(cfg.num_groups, cfg.group_size)] == [(32, 8)]


def test_exact_counts_of_paper_md_4_3():
    moe256 = PRESETS["lm1b/MoE-256"]
    assert flops.lstm_params_total(moe256) == 4_194_304
    assert flops.expert_params(moe256) == 1_048_576
    assert flops.params_excl_embedding_softmax(moe256) == 272_891_904
    assert flops.ops_per_timestep(moe256) == 8_650_752
    assert flops.ops_per_timestep(PRESETS["lm1b/LSTM-2048-512"]) == 9_437_184
    assert flops.ops_per_timestep(PRESETS["lm1b/2xLSTM-8192-1024"]) == 150_994_944
    assert flops.total_params(PRESETS["lm1b/MoE-4096-h"]) == 4_303_372_288 + 2 * 793_471 * 512


def test_expert_flops_share_claim_of_section_5_1():
    """Sec. 5.1: expert FLOPs are 37%-46% of the total for all (1B-word) MoE models."""
    for name, cfg in PRESETS.items():
        if name.startswith("lm1b/") and cfg.moe != "none":
            share = 6 * flops.expert_ops_per_timestep(cfg) / flops.train_flops_per_token(cfg)
            assert 0.37 <= share <= 0.46, (name, share)
    assert SOFTMAX_SAMPLES == 4096


# Tiny configs, counted by hand: d=4, V=10, two 4-unit LSTMs of 4·4·(4+4) = 128 weights each.
_TINY = {"name": "tiny", "vocab_size": 10, "d_model": 4, "lstm_layers": ((4, None), (4, None))}


def _flat(n=3, k=2) -> ModelConfig:  # experts 4 -> 5 -> 4
    return ModelConfig(**_TINY, softmax_samples=None, moe="flat", num_experts=n, d_hidden=5, k=k)


def _hier(a=2, b=3, kp=1, ks=2) -> ModelConfig:
    return ModelConfig(
        **_TINY, softmax_samples=None, moe="hierarchical", num_experts=a * b, d_hidden=5,
        num_groups=a, group_size=b, k_primary=kp, k_secondary=ks,
    )  # fmt: skip


def test_hand_computed_flat():
    cfg = _flat()  # experts 2·4·5 = 40 weights; gate 2·4·3 = 24
    assert flops.params_excl_embedding_softmax(cfg) == 256 + 3 * 40 + 24 == 400
    assert flops.ops_per_timestep(cfg) == 256 + 2 * 40 + 24 == 360
    assert flops.total_params(cfg) == 400 + 2 * 10 * 4
    assert flops.train_flops_per_token(cfg) == 2 * 3 * (360 + 4 * 10)  # full softmax
    sampled = dataclasses.replace(cfg, softmax_samples=3)
    assert flops.train_flops_per_token(sampled) == 2 * 3 * (360 + 4 * (3 + 1))
    assert flops.train_flops_per_token(dataclasses.replace(cfg, softmax_samples=0)) == 2400


def test_hand_computed_hierarchical_counts_only_selected_secondary_gates():
    cfg = _hier()  # primary gate 2·4·2 = 16; each secondary 2·4·3 = 24
    assert flops.params_excl_embedding_softmax(cfg) == 256 + 6 * 40 + 16 + 2 * 24
    assert flops.ops_per_timestep(cfg) == 256 + 1 * 2 * 40 + 16 + 1 * 24


def test_hand_computed_lstm_projection_and_deep_expert():
    assert flops.lstm_params(3, 5, 2) == 4 * 5 * (3 + 2) + 5 * 2
    assert flops.lstm_params(3, 5, None) == 4 * 5 * (3 + 5)
    deep = ModelConfig(
        **_TINY,
        softmax_samples=None,
        moe="dense",
        num_experts=1,
        d_hidden=5,
        expert_hidden_layers=3,
    )
    assert flops.expert_params(deep) == 4 * 5 + 2 * 5 * 5 + 5 * 4
    assert flops.ops_per_timestep(deep) == flops.params_excl_embedding_softmax(deep) == 256 + 90
    lstm_only = ModelConfig(**_TINY, softmax_samples=None)
    assert (
        flops.params_excl_embedding_softmax(lstm_only) == flops.ops_per_timestep(lstm_only) == 256
    )


def test_ops_grow_with_k():
    flat = [flops.ops_per_timestep(_flat(n=8, k=k)) for k in range(1, 9)]
    assert all(b - a == flops.expert_params(_flat()) for a, b in itertools.pairwise(flat))
    assert flops.ops_per_timestep(_hier(kp=2, ks=2)) > flops.ops_per_timestep(_hier(kp=1, ks=2))
    assert flops.ops_per_timestep(_hier(kp=1, ks=3)) > flops.ops_per_timestep(_hier(kp=1, ks=2))


def test_ops_grow_with_num_experts_only_through_the_gate():
    d = _TINY["d_model"]
    for n in (4, 8, 16):
        small, big = _flat(n=n, k=2), _flat(n=2 * n, k=2)
        assert flops.ops_per_timestep(big) - flops.ops_per_timestep(small) == 2 * d * n
        assert flops.ops_per_timestep(small) - flops.gate_ops(small) == 256 + 2 * 40
    # hierarchical: more groups cost 2·d per group; bigger groups 2·d per expert per selected group
    assert flops.ops_per_timestep(_hier(a=4)) - flops.ops_per_timestep(_hier(a=2)) == 2 * d * 2
    assert flops.ops_per_timestep(_hier(b=5)) - flops.ops_per_timestep(_hier(b=3)) == 1 * 2 * d * 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"moe": "sparse"}, "moe"),
        ({"d_model": 0}, "d_model"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"lstm_layers": ((4, None), (8, None))}, "lstm_layers[1]"),
        ({"lstm_layers": ((8, 4), (0, None))}, "lstm_layers[1].units"),
        ({"softmax_samples": 10}, "softmax_samples"),
        ({"num_experts": 3}, "num_experts"),  # moe='none'
        ({"moe": "dense", "num_experts": 2, "d_hidden": 5}, "num_experts"),
        ({"moe": "dense", "num_experts": 1, "d_hidden": 0}, "d_hidden"),
        ({"moe": "flat", "num_experts": 4, "d_hidden": 5, "k": 5}, "k"),
        ({"moe": "flat", "num_experts": 4, "d_hidden": 5, "k": None}, "k"),
        ({"moe": "flat", "num_experts": 4, "d_hidden": 5, "k": 2, "num_groups": 2}, "num_groups"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} "):
        ModelConfig(**{**_TINY, "softmax_samples": None, **kwargs})


def test_bad_hierarchical_config_raises_value_error_naming_the_field():
    with pytest.raises(
        ValueError, match=r"^num_groups x group_size must equal num_experts=16, got 3 x 4"
    ):
        dataclasses.replace(_hier(), num_experts=16, num_groups=3, group_size=4)
    with pytest.raises(ValueError, match=r"^k_primary must be in \[1, 2\], got 3"):
        _hier(kp=3)
    with pytest.raises(ValueError, match=r"^k_secondary must be in \[1, 3\], got 4"):
        _hier(ks=4)
    with pytest.raises(ValueError, match=r"^k does not apply to moe='hierarchical'"):
        dataclasses.replace(_hier(), k=2)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    flops_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return flops_cli.run(parser.parse_args(["flops", *argv]))


def test_cli_json_has_every_preset_and_the_required_keys(capsys):
    assert _cli(["--paper", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == list(PRESETS)
    for r in rows:
        for key in ("params_excl_embedding_softmax", "total_params", "ops_per_timestep"):
            assert isinstance(r[key], int)
        assert r["train_flops_per_token"] > 6 * r["ops_per_timestep"]
        assert isinstance(r["paper_params_M"], float) and isinstance(r["paper_ops_M"], float)
        assert r["paper_source"] in ("Table 7", "Table 8")
    moe256 = next(r for r in rows if r["model"] == "lm1b/MoE-256")
    assert moe256["ops_per_timestep"] == 8_650_752 and moe256["paper_ops_M"] == 8.6
    assert moe256["paper_notes"] and "truncated" in moe256["paper_notes"][0]


def test_cli_model_selection_and_table(capsys):
    assert _cli(["--model", "news100b/MoE-32", "--model", "lm1b/MoE-4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["news100b/MoE-32", "lm1b/MoE-4"]
    assert "paper_params_M" not in rows[0]
    assert _cli(["--paper", "--model", "lm1b/MoE-256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "paper ops" in lines[0] and lines[1].split()[0] == "lm1b/MoE-256"
    assert lines[-1].startswith("note: lm1b/MoE-256, Table 7 ops_M: truncated")


def test_cli_unknown_model_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown model 'lm1b/MoE-7'; valid names: .*lm1b/MoE-4096-h"
    ):
        _cli(["--model", "lm1b/MoE-7"])
