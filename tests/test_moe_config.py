"""MoEConfig: one validated, frozen set of hyper-parameters behind MoE, HierarchicalMoE and their
expert-parallel twins (moe_impl/layer/config.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from parallel_workers import config_round_trip

from moe_impl import HierarchicalMoE, MoE, MoEConfig
from moe_impl.layer.config import OPTIONS, SPARSE_GRAD_MIN_EXPERTS
from moe_impl.parallel import DistributedMoE, spawn

FLAT = dict(d_model=8, d_hidden=16, num_experts=4)
HIER = dict(d_model=8, d_hidden=16, num_groups=4, group_size=3)

# (fields, the field named in the message, the bad value as the message shows it)
BAD_CONFIGS = [
    ({**FLAT, "d_model": 0}, "d_model", "0"),
    ({**FLAT, "d_hidden": -1}, "d_hidden", "-1"),
    ({**FLAT, "d_hidden": 16.0}, "d_hidden", "16.0"),
    ({**FLAT, "num_experts": 0}, "num_experts", "0"),
    ({**FLAT, "num_experts": True}, "num_experts", "True"),
    ({**FLAT, "k": 0}, "k", "0"),
    ({**FLAT, "k": 5}, "k", "5"),
    ({**HIER, "num_groups": 0}, "num_groups", "0"),
    ({**HIER, "group_size": 2.5}, "group_size", "2.5"),
    ({**HIER, "k_primary": 5}, "k_primary", "5"),
    ({**HIER, "k_secondary": 0}, "k_secondary", "0"),
    ({**HIER, "k_secondary": 4}, "k_secondary", "4"),
    ({**HIER, "num_experts": 16}, "num_experts", "16"),
    ({**HIER, "k": 2}, "k", "2"),  # flat-only field on a hierarchical layer
    ({**FLAT, "k_primary": 2}, "k_primary", "2"),  # and the other way round
    ({**FLAT, "w_importance": -0.1}, "w_importance", "-0.1"),
    ({**FLAT, "w_load": float("nan")}, "w_load", "nan"),
    ({**FLAT, "capacity_factor": 0.0}, "capacity_factor", "0.0"),
    ({**FLAT, "capacity_factor": -1}, "capacity_factor", "-1"),
    ({**FLAT, "noisy_gating": "yes"}, "noisy_gating", "'yes'"),
    ({**FLAT, "sparse_grad": 1}, "sparse_grad", "1"),
    ({**HIER, "gate_precision": "fp16"}, "gate_precision", "'fp16'"),
    ({"d_model": 8, "d_hidden": 16}, "num_experts", "None"),  # no layout at all
]


@pytest.mark.parametrize(("fields", "name", "value"), BAD_CONFIGS)
def test_bad_fields_raise_value_error_naming_field_and_value(fields, name, value):
    with pytest.raises(ValueError) as err:
        MoEConfig(**fields)
    message = str(err.value)
    assert re.search(rf"\b{name}\b", message), message
    assert value in message, message


def test_layer_constructors_raise_the_config_errors():
    """The layers check nothing themselves: their errors are MoEConfig's, word for word (the
    expert-parallel layers take a config, built and checked before them)."""
    cases = [
        (lambda: MoE(8, 16, 4, k=5), dict(FLAT, k=5)),
        (lambda: HierarchicalMoE(8, 16, 4, 3, k_secondary=4), dict(HIER, k_secondary=4)),
        (lambda: MoE(8, 16, 4, w_load=-1.0), dict(FLAT, w_load=-1.0)),
    ]
    for build, fields in cases:
        with pytest.raises(ValueError) as want:
            MoEConfig(**fields)
        with pytest.raises(ValueError, match=re.escape(str(want.value))):
            build()


def test_defaults_are_filled_in():
    flat = MoEConfig(**FLAT)
    assert (flat.k, flat.num_groups, flat.k_primary, flat.k_secondary) == (4, None, None, None)
    assert not flat.hierarchical and flat.experts_per_token == 4
    assert (flat.w_importance, flat.w_load, flat.noisy_gating) == (0.1, 0.1, True)
    assert flat.capacity_factor is None and flat.sparse_grad is None

    hier = MoEConfig(**HIER)
    assert (hier.k_primary, hier.k_secondary, hier.k) == (2, 2, None)
    assert hier.num_experts == 12 and hier.hierarchical and hier.experts_per_token == 4
    assert MoEConfig(**HIER, num_experts=12) == hier  # a consistent num_experts is accepted


def test_sparse_grad_resolves_by_the_number_of_experts():
    n = SPARSE_GRAD_MIN_EXPERTS
    assert not MoEConfig(d_model=2, d_hidden=2, num_experts=n - 1).use_sparse_grad
    assert MoEConfig(d_model=2, d_hidden=2, num_experts=n).use_sparse_grad
    assert MoEConfig(d_model=2, d_hidden=2, num_groups=64, group_size=n // 64).use_sparse_grad
    assert not MoEConfig(d_model=2, d_hidden=2, num_experts=n, sparse_grad=False).use_sparse_grad
    assert MoEConfig(d_model=2, d_hidden=2, num_experts=2, k=1, sparse_grad=True).use_sparse_grad


def test_config_is_frozen_and_hashable():
    config = MoEConfig(**FLAT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 2
    assert hash(config) == hash(MoEConfig(**FLAT, k=4))
    # replace() builds (and validates) a new config
    assert dataclasses.replace(config, w_load=0.0).w_load == 0.0 and config.w_load == 0.1
    with pytest.raises(ValueError, match="k=5 must be <= num_experts=4"):
        dataclasses.replace(config, k=5)
    with pytest.raises(TypeError):  # keyword-only
        MoEConfig(8, 16, 4)


@pytest.mark.parametrize(
    ("build", "config"),
    [
        (
            lambda: MoE(8, 16, 6, 3, w_importance=0.2, capacity_factor=1.5, sparse_grad=True),
            MoEConfig(
                d_model=8,
                d_hidden=16,
                num_experts=6,
                k=3,
                w_importance=0.2,
                capacity_factor=1.5,
                sparse_grad=True,
            ),
        ),
        (
            lambda: HierarchicalMoE(8, 16, 4, 3, 1, noisy_gating=False, w_load=0.0),
            MoEConfig(**HIER, k_primary=1, noisy_gating=False, w_load=0.0),
        ),
    ],
)
def test_layers_expose_their_config_and_rebuild_from_it(build, config):
    torch.manual_seed(0)
    layer = build()
    assert layer.config == config
    for rebuild in (type(layer), type(layer).from_config):  # Layer(config), from_config(config)
        torch.manual_seed(0)
        again = rebuild(layer.config)
        assert again.config == layer.config and repr(again) == repr(layer)
        state, state_again = layer.state_dict(), again.state_dict()
        assert list(state) == list(state_again)  # the same parameter names, in the same order
        assert all(torch.equal(state[name], state_again[name]) for name in state)  # same draws


def test_a_config_and_arguments_together_are_refused():
    with pytest.raises(ValueError, match=r"MoE takes a MoEConfig or .* not both: .* k=2"):
        MoE(MoEConfig(**FLAT), k=2)
    with pytest.raises(ValueError, match=r"HierarchicalMoE .* not both: .*w_load=0\.0"):
        HierarchicalMoE(MoEConfig(**HIER), w_load=0.0)
    with pytest.raises(ValueError, match="config must be a MoEConfig, got dict"):
        DistributedMoE(FLAT)


def test_the_defaults_are_written_once():
    """The layers' options default to MoEConfig's fields; a model's layer (ModelConfig.layer) is a
    MoEConfig, and the run config's model section defaults to the same values, read from it."""
    from moe_impl.model.config import ModelConfig
    from moe_impl.model.presets import ALL_PRESETS
    from moe_impl.train.config import TRAINING_FIELDS, ModelSection

    config, section = MoEConfig(**FLAT), ModelSection()
    assert MoE(8, 16, 4).config == config and HierarchicalMoE(8, 16, 4, 3).config == MoEConfig(
        **HIER
    )
    model = ALL_PRESETS[section.preset]
    assert isinstance(model.layer, MoEConfig)
    for name in ("noisy_gating", "w_importance", "w_load", "sparse_grad"):
        assert getattr(model.layer, name) == getattr(config, name) == getattr(section, name)
    assert model.dropout == section.dropout == ModelConfig.dropout
    # the section's training options reach the resolved model's layer
    assert set(TRAINING_FIELDS) == {"dropout", *OPTIONS} - {"capacity_factor"}
    section = ModelSection(w_load=0.3, dropout=0.2, sparse_grad=True, gate_precision="bf16")
    resolved = section.resolve(577)
    assert resolved.dropout == 0.2 and resolved.layer == dataclasses.replace(
        model.layer, w_load=0.3, sparse_grad=True, gate_precision="bf16"
    )


def test_an_unknown_option_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"MoE got an unknown option num_groups=4; its options"):
        MoE(8, 16, 4, num_groups=4)
    with pytest.raises(ValueError, match=r"HierarchicalMoE got an unknown option k=2"):
        HierarchicalMoE(8, 16, 4, 3, k=2)


def test_from_config_refuses_a_config_of_the_other_kind():
    with pytest.raises(ValueError, match="MoE needs a config with num_experts"):
        MoE.from_config(MoEConfig(**HIER))
    with pytest.raises(ValueError, match="HierarchicalMoE needs a config with num_groups"):
        HierarchicalMoE.from_config(MoEConfig(**FLAT))
    # the expert-parallel layers are dropless (checked before any process group is needed)
    with pytest.raises(ValueError, match=r"DistributedMoE is dropless: capacity_factor .* 1\.5"):
        DistributedMoE.from_config(MoEConfig(**FLAT, capacity_factor=1.5))


@pytest.mark.integration
def test_distributed_layers_expose_their_config_and_rebuild_from_it():
    """In a one-rank gloo group: the config of each expert-parallel layer and its from_config
    round trip (parameter names and initial values, extra arguments passed through)."""
    configs = [
        MoEConfig(d_model=5, d_hidden=7, num_experts=6, k=2, w_importance=0.3, sparse_grad=True),
        MoEConfig(d_model=5, d_hidden=7, num_groups=3, group_size=2, k_secondary=1),
    ]
    (results,) = spawn(config_round_trip, 1, (configs,), timeout_s=120)
    for config, result in zip(configs, results, strict=True):
        assert result["config"] == config and result["rebuilt_config"] == config
        assert result["same_state"] and result["replicate_noise"]
        want = HierarchicalMoE if config.hierarchical else MoE
        assert result["state_names"] == list(want.from_config(config).state_dict())
