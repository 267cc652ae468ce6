"""ModelConfig: the nested layer config, its flat form (run configs, presets, summary.json) and the
errors of a bad one."""

from __future__ import annotations

import dataclasses

import pytest

from moe_impl.layer.config import MoEConfig
from moe_impl.model.config import FLAT_KEYS, LAYOUT_DEFAULTS, DenseConfig, ModelConfig
from moe_impl.model.presets import ALL_PRESETS

_TINY = {"name": "tiny", "vocab_size": 10, "d_model": 4, "lstm_layers": ((4, None), (4, None))}


@pytest.mark.parametrize("name", sorted(ALL_PRESETS))
def test_every_preset_round_trips_through_its_flat_form(name):
    cfg = ALL_PRESETS[name]
    flat = cfg.flat()
    assert tuple(flat) == FLAT_KEYS
    assert ModelConfig.build(**flat) == cfg
    kind = {MoEConfig: cfg.moe if cfg.moe != "dense" else None, DenseConfig: "dense"}
    assert kind.get(type(cfg.layer), "none") == flat["moe"]
    if isinstance(cfg.layer, MoEConfig):  # the flat form's sizes are the layer's own
        assert cfg.layer.layout_fields().items() <= {**flat, "d_model": cfg.d_model}.items()


def test_the_flat_form_of_each_kind():
    lstm = ModelConfig.build(**_TINY, softmax_samples=None)
    assert lstm.layer is None and lstm.flat() == {
        **_TINY,
        "softmax_samples": None,
        **LAYOUT_DEFAULTS,
    }
    # the gate's options are checked and have no effect without a gate (one sweep's overrides)
    assert (
        ModelConfig.build(**_TINY, softmax_samples=None, w_load=0.0, gate_precision="bf16") == lstm
    )
    deep = ModelConfig.build(
        **_TINY,
        softmax_samples=None,
        moe="dense",
        num_experts=1,
        d_hidden=5,
        expert_hidden_layers=3,
    )
    assert deep.layer == DenseConfig(d_hidden=5, hidden_layers=3) and deep.moe == "dense"
    assert (deep.num_experts, deep.d_hidden, deep.expert_hidden_layers, deep.k) == (1, 5, 3, None)
    hier = ModelConfig.build(
        **_TINY,
        softmax_samples=None,
        moe="hierarchical",
        num_experts=6,
        d_hidden=5,
        num_groups=2,
        group_size=3,
        k_primary=1,
        k_secondary=2,
        w_load=0.3,
        dropout=0.2,
    )
    assert hier.layer == MoEConfig(
        d_model=4, d_hidden=5, num_groups=2, group_size=3, k_primary=1, k_secondary=2, w_load=0.3
    )
    assert hier.dropout == 0.2 and hier.flat()["k"] is None and hier.flat()["num_experts"] == 6
    # the flat form is the layout only; replace keeps how the model trains
    assert "w_load" not in hier.flat() and "dropout" not in hier.flat()
    again = hier.replace(d_hidden=7)
    assert again.layer == dataclasses.replace(hier.layer, d_hidden=7) and again.dropout == 0.2


def test_a_nested_layer_is_checked_against_the_model():
    with pytest.raises(
        ValueError, match=r"^the MoE layer's d_model=8 must equal the model's d_model=4"
    ):
        ModelConfig(
            **_TINY, softmax_samples=None, layer=MoEConfig(d_model=8, d_hidden=5, num_experts=4)
        )
    with pytest.raises(ValueError, match=r"^layer must be a MoEConfig, a DenseConfig or None"):
        ModelConfig(**_TINY, softmax_samples=None, layer={"num_experts": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # an expert of the gated layers has one hidden layer: a deeper one would go uncounted
        (
            {"moe": "flat", "num_experts": 4, "d_hidden": 5, "expert_hidden_layers": 2},
            r"^expert_hidden_layers does not apply to moe='flat'; got expert_hidden_layers=2",
        ),
        ({"moe": "gated"}, r"^moe must be one of"),
        (
            {"moe": "flat", "num_experts": 4, "d_hidden": 5, "w_loud": 0.1},
            r"^unknown model field w_loud=0.1; valid: name, ",
        ),
        (
            {"moe": "flat", "num_experts": 4, "d_hidden": 5, "w_load": -1.0},
            r"^w_load must be >= 0, got -1.0",
        ),
        ({"dropout": 1.0}, r"^dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": "x"}, r"^dropout must be in \[0, 1\), got 'x'"),
        ({"softmax_samples": "x"}, r"^softmax_samples must be an integer or None, got 'x'"),
        # a model without a gate checks the gate's options too (they then have no effect)
        ({"gate_precision": "fp8"}, r"^gate_precision must be one of float32, tf32, bf16"),
        (
            {"moe": "dense", "num_experts": 1, "d_hidden": 5, "w_load": -1.0},
            r"^w_load must be >= 0, got -1.0",
        ),
        (
            {"moe": "dense", "num_experts": 1, "d_hidden": 5, "expert_hidden_layers": 0},
            r"^expert_hidden_layers must be a positive integer, got 0",
        ),
    ],
)
def test_a_bad_flat_form_is_one_line_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.build(**{**_TINY, "softmax_samples": None, **kwargs})
