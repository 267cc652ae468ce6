"""The run table of a workflow config without Snakemake (moe_impl/runs/sweeps.py): which runs a
config has, in order, and the `train --set` overrides of each, as the workflow's train rule passes
them (tests/test_workflow_gpu.py compares the two on config/gpu.yaml).

Unit tier: plain YAML and the training's config loader, no snakemake."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from moe_impl.model.presets import ALL_PRESETS
from moe_impl.runs.sweeps import (
    DEFAULTS,
    PlannedRun,
    planned_runs,
    selected_sweeps,
    set_overrides,
    yaml_value,
)
from moe_impl.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "config/config.yaml",
    "config/smoke.yaml",
    "config/paper.yaml",
    "config/gpu.yaml",
]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def tiny_config(**top) -> dict:
    return {
        "train_config": "config/train/smoke.yaml",
        "sweeps": {
            "a": {"models": ["MoE-4", {"name": "M8", "preset": "MoE-32", "set": {"k": 2}}]},
            "b": {
                "presets": "lm1b/",
                "models": ["MoE-256"],
                "balance_weights": [[0.0, 0.1], [1.0, 1.0]],
                "set": {"train.tokens": 100, "eval.at_tokens": [10, 20]},
            },
        },
        "bench": {"experts": ["4"], "tokens": 8},
        **top,
    }


def test_runs_and_overrides_in_config_order():
    runs = planned_runs(tiny_config())
    assert runs == [
        PlannedRun(
            "a",
            "MoE-4",
            "cpu/MoE-4",
            ["model.preset=cpu/MoE-4", "sweep=a", "name=MoE-4", "train.seed=0"],
        ),
        PlannedRun(
            "a",
            "M8",
            "cpu/MoE-32",
            ["model.preset=cpu/MoE-32", "sweep=a", "name=M8", "k=2", "train.seed=0"],
        ),
        PlannedRun(
            "b",
            "MoE-256_wi0_wl0.1",
            "lm1b/MoE-256",
            [
                "model.preset=lm1b/MoE-256",
                "sweep=b",
                "name=MoE-256_wi0_wl0.1",
                "model.w_importance=0",
                "model.w_load=0.1",
                "train.tokens=100",
                "eval.at_tokens=[10, 20]",
                "train.seed=0",
            ],
        ),
        PlannedRun(
            "b",
            "MoE-256_wi1_wl1",
            "lm1b/MoE-256",
            [
                "model.preset=lm1b/MoE-256",
                "sweep=b",
                "name=MoE-256_wi1_wl1",
                "model.w_importance=1",
                "model.w_load=1",
                "train.tokens=100",
                "eval.at_tokens=[10, 20]",
                "train.seed=0",
            ],
        ),
    ]
    assert runs[0].overrides == runs[0][3]  # a NamedTuple: (sweep, run, preset, overrides)


def test_data_path_adds_its_path_and_data_path_set_only_when_set():
    cfg = tiny_config(data_path_set={"data.corpus": "lm1b", "eval.tokens": None})
    assert all("data.corpus=lm1b" not in r.overrides for r in planned_runs(cfg))
    cfg["data_path"] = "data/lm1b"
    run = planned_runs(cfg)[2]
    # after the identity, before the balance weights and the sweep's set
    assert run.overrides[3:7] == [
        "data.path=data/lm1b",
        "data.corpus=lm1b",
        "eval.tokens=null",
        "model.w_importance=0",
    ]


def test_a_configs_experiment_goes_to_every_run_after_its_name():
    """The MLflow experiment of a config (docs/tracking.md): named, it follows `name=`; absent,
    no override, so the training config's (`moe`) holds and no run's values change."""
    runs = planned_runs(tiny_config(experiment="moe-x"))
    assert all(r.overrides[3] == "experiment=moe-x" for r in runs)
    assert load_config([], runs[0].overrides).experiment == "moe-x"
    assert not any(
        o.startswith("experiment=") for r in planned_runs(tiny_config()) for o in r.overrides
    )
    names = {load(c).get("experiment") for c in CONFIGS}
    assert len(names) == len(CONFIGS)  # one experiment per shipped config (None: config.yaml's)


def test_sweeps_to_run_picks_sweeps_in_its_order_and_names_unknown_ones():
    cfg = tiny_config(sweeps_to_run=["b", "a"])
    assert selected_sweeps(cfg) == ["b", "a"]
    assert [r.sweep for r in planned_runs(cfg)] == ["b", "b", "a", "a"]
    cfg["sweeps_to_run"] = ["a", "news"]
    with pytest.raises(
        ValueError,
        match=r"^config sweeps_to_run: 'news' is not a sweep of this config; its sweeps are a, b$",
    ):
        planned_runs(cfg)


def test_an_empty_sweep_has_no_runs():
    cfg = tiny_config()
    cfg["sweeps"]["a"]["models"] = []
    assert [r.sweep for r in planned_runs(cfg)] == ["b", "b"]


def test_check_sees_every_run_and_its_errors_name_the_entry():
    seen = []
    planned_runs(tiny_config(), check=seen.append)
    assert [r.run for r in seen] == ["MoE-4", "M8", "MoE-256_wi0_wl0.1", "MoE-256_wi1_wl1"]

    def refuse_m8(run):
        if run.run == "M8":
            raise ValueError("k must be in [1, 32], got 99")

    with pytest.raises(ValueError, match=r"^config sweeps\.a\.models\[1\] \(M8\): k must be"):
        planned_runs(tiny_config(), check=refuse_m8)


def test_a_run_listed_twice_is_an_error():
    cfg = tiny_config()
    cfg["sweeps"]["a"]["models"].append("MoE-4")
    with pytest.raises(
        ValueError, match=r"^config sweeps\.a\.models\[2\]: run a/MoE-4 is listed twice$"
    ):
        planned_runs(cfg)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (0.01, "0.01"),
        (1048576000, "1048576000"),
        ([1, [2, None]], "[1, [2, null]]"),
        ("lm1b", "lm1b"),
    ],
)
def test_values_are_written_as_yaml_that_reads_back(value, text):
    assert yaml_value(value) == text
    assert yaml.safe_load(text) == value
    assert set_overrides({"a.b": value}) == [f"a.b={text}"]


def test_defaults_are_the_schema_defaults():
    """Top-level keys at the top; `seeds` is a key of each sweep (and, without a default, of a
    model entry, which then takes its sweep's)."""
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    sweep = schema["properties"]["sweeps"]["additionalProperties"]["properties"]
    for key, value in DEFAULTS.items():
        place = sweep if key == "seeds" else schema["properties"]
        assert place[key]["default"] == value, key
    entry = schema["properties"]["sweeps"]["additionalProperties"]["properties"]["models"]
    entry = entry["items"]["oneOf"][1]["properties"]["seeds"]
    assert "default" not in entry  # Snakemake fills defaults in: the sweep's would be lost


def test_seeds_of_a_sweep_and_of_an_entry_plan_one_run_each():
    """Seed 0 keeps the run's name; seed S appends `_seed<S>` after the balance weights; the
    seed is the last override; an entry's own seeds replace the sweep's."""
    cfg = tiny_config()
    cfg["sweeps"]["b"]["seeds"] = [0, 1]
    cfg["sweeps"]["a"]["seeds"] = [2]
    cfg["sweeps"]["a"]["models"][1]["seeds"] = [0, 3]
    runs = planned_runs(cfg)
    assert [(r.sweep, r.run) for r in runs] == [
        ("a", "MoE-4_seed2"),
        ("a", "M8"),
        ("a", "M8_seed3"),
        ("b", "MoE-256_wi0_wl0.1"),
        ("b", "MoE-256_wi0_wl0.1_seed1"),
        ("b", "MoE-256_wi1_wl1"),
        ("b", "MoE-256_wi1_wl1_seed1"),
    ]
    assert [r.overrides[-1] for r in runs] == [f"train.seed={s}" for s in (2, 0, 3, 0, 1, 0, 1)]
    assert runs[4].overrides[:3] == [
        "model.preset=lm1b/MoE-256",
        "sweep=b",
        "name=MoE-256_wi0_wl0.1_seed1",
    ]
    seeded = load_config([ROOT / cfg["train_config"]], runs[4].overrides)
    assert (seeded.train.seed, seeded.name) == (1, "MoE-256_wi0_wl0.1_seed1")


def test_without_seeds_the_runs_are_those_of_seeds_0():
    """The schema's default, [0]: a config without `seeds` plans the same runs (names, results
    paths) as one with `seeds: [0]` everywhere, and as before seeds existed."""
    cfg = tiny_config()
    explicit = tiny_config()
    for spec in explicit["sweeps"].values():
        spec["seeds"] = [0]
    assert planned_runs(cfg) == planned_runs(explicit)
    assert [r.run for r in planned_runs(cfg)] == [
        "MoE-4",
        "M8",
        "MoE-256_wi0_wl0.1",
        "MoE-256_wi1_wl1",
    ]


@pytest.mark.parametrize(
    ("where", "seeds", "message"),
    [
        ("sweep", [], r"^config sweeps\.b\.seeds: must be a non-empty list of seeds, got \[\]$"),
        ("sweep", 1, r"^config sweeps\.b\.seeds: must be a non-empty list of seeds, got 1$"),
        (
            "sweep",
            [0, -1],
            r"^config sweeps\.b\.seeds: .*non-negative integers, got -1 in \[0, -1\]$",
        ),
        ("sweep", [0, 1.5], r"^config sweeps\.b\.seeds: .*non-negative integers, got 1\.5 in"),
        ("sweep", [True], r"^config sweeps\.b\.seeds: .*non-negative integers, got True in"),
        ("sweep", [1, 1], r"^config sweeps\.b\.seeds: seeds must be distinct, got \[1, 1\]$"),
        ("entry", [0, "1"], r"^config sweeps\.a\.models\[1\]\.seeds: .*got '1' in \[0, '1'\]$"),
    ],
)
def test_bad_seeds_are_errors_naming_the_key_and_value(where, seeds, message):
    cfg = tiny_config()
    target = cfg["sweeps"]["b"] if where == "sweep" else cfg["sweeps"]["a"]["models"][1]
    target["seeds"] = seeds
    with pytest.raises(ValueError, match=message):
        planned_runs(cfg)


def test_a_train_seed_in_a_set_is_an_error_naming_the_entry():
    """The seeds choose the seed (the workflow cannot tell an absent `seeds` from the default)."""
    cfg = tiny_config()
    cfg["sweeps"]["a"]["models"][1]["set"]["train.seed"] = 5
    with pytest.raises(
        ValueError, match=r"^config sweeps\.a\.models\[1\] \(M8\): train\.seed in its set:"
    ):
        planned_runs(cfg)
    cfg = tiny_config()
    cfg["sweeps"]["b"]["set"]["train.seed"] = 5
    with pytest.raises(
        ValueError,
        match=r"^config sweeps\.b\.models\[0\] \(MoE-256\): train\.seed in sweeps\.b\.set",
    ):
        planned_runs(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_planned_run_of_the_shipped_configs_resolves(name):
    """Each run's overrides make a valid training config on top of the config's train_config, for
    a preset that exists, and no run is planned twice."""
    cfg = load(name)
    runs = planned_runs(cfg)
    assert runs and len({(r.sweep, r.run) for r in runs}) == len(runs)
    for run in runs:
        assert run.preset in ALL_PRESETS
        resolved = load_config([ROOT / cfg["train_config"]], run.overrides)
        assert (resolved.model.preset, resolved.sweep, resolved.name) == (
            run.preset,
            run.sweep,
            run.run,
        )


def test_the_gpu_config_plans_the_paper_sweeps_on_the_gpu_family():
    cfg = load("config/gpu.yaml")
    runs = planned_runs(cfg)
    by_sweep = {s: [r.run for r in runs if r.sweep == s] for s in cfg["sweeps"]}
    assert len(by_sweep["lm1b"]) == 10 and by_sweep["lm1b"][-1] == "MoE-1-Deep"
    assert by_sweep["news100b"][:7] == [
        f"MoE-{n}" for n in ("32", "256-h", "1024-h", "4096-h", "16384-h", "65536-h", "131072-h")
    ]
    assert len(by_sweep["balance"]) == 6 and len(runs) == 24
    # the 100B-word sweep on the paper's fixed expert (gpu-h64/), the others on gpu/
    families = {(r.sweep, r.preset.split("/")[0]) for r in runs}
    assert families == {("lm1b", "gpu"), ("balance", "gpu"), ("news100b", "gpu-h64")}
    for run in runs:
        resolved = load_config([ROOT / cfg["train_config"]], run.overrides)
        train = resolved.train
        assert (train.device, train.dtype) == ("cuda", "bfloat16")
        assert train.tokens % train.tokens_per_step == 0  # whole steps
        # one forward pass is 4096 x 64 = 262,144 positions; App. D's ~2.5M-word steps as 8 of them
        assert train.tokens_per_step // train.micro_batches == 262_144
        if run.sweep == "news100b":  # N and 10N, at 2,097,152 positions a step
            assert resolved.eval.at_tokens == (train.tokens // 10,)
            assert (train.tokens_per_step, train.micro_batches) == (2_097_152, 8)
    # LM1B instead, when data_path is set: the corpus, the sampled softmax, the whole test shard
    cfg["data_path"] = "data/lm1b"
    resolved = load_config([ROOT / cfg["train_config"]], planned_runs(cfg)[0].overrides)
    assert (resolved.data.corpus, resolved.data.path) == ("lm1b", "data/lm1b")
    assert resolved.model.softmax_samples == 4096 and resolved.eval.tokens is None


def test_the_module_imports_the_standard_library_only():
    """No snakemake, torch or other moe_impl module (tests/test_imports.py holds the layering)."""
    tree = ast.parse((ROOT / "moe_impl/runs/sweeps.py").read_text())
    imported = {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "collections.abc", "typing"}, imported
