"""The run config (moe_impl/train/config.py): YAML -> RunConfig -> the run directory's config.yaml,
`--set` parsing, validation that names the key, immutability."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from moe_impl.cli import main
from moe_impl.data.synthetic import TopicMarkovConfig
from moe_impl.model.config import FLAT_KEYS
from moe_impl.train.config import (
    MODEL_FIELDS,
    DataSection,
    DistributedSection,
    EvalSection,
    ModelSection,
    RunConfig,
    TelemetrySection,
    TrackingSection,
    TrainSection,
    dump,
    load_config,
    model_config,
)

FILE = {"data": {"synthetic": {"vocab_size": 128}}, "model": {"dropout": 0.0}}
OVERRIDES = [
    "model.preset=cpu/MoE-256-h",
    "model.lstm_layers=[[64, null]]",
    "eval.at_tokens=[1e3, 2000]",
    "train.tokens=1e6",
    "train.lr=3e-4",
    "sweep=s1",
]
# config.yaml of FILE + OVERRIDES as the dict-based config wrote it before the typed sections: every
# key, in this order, with these value types (`dropout: 0.0` in a file is read as the int 0)
CONFIG_YAML = """\
name: null
experiment: moe
sweep: s1
model:
  preset: cpu/MoE-256-h
  name: null
  d_model: null
  lstm_layers:
  - - 64
    - null
  softmax_samples: null
  moe: null
  num_experts: null
  d_hidden: null
  expert_hidden_layers: null
  k: null
  num_groups: null
  group_size: null
  k_primary: null
  k_secondary: null
  dropout: 0
  w_importance: 0.1
  w_load: 0.1
  noisy_gating: true
  sparse_grad: null
  gate_precision: float32
  compile: false
data:
  corpus: synthetic
  path: null
  vocab_file: null
  cache_dir: null
  max_train_shards: null
  min_count: 1
  max_vocab: null
  synthetic:
    vocab_size: 128
    num_topics: 64
    fanout: 4
    num_clusters: 1
    shared_fanout: 0
    zipf_s: 1.0
    row_beta: 1.0
    eos_prob: 0.0625
    max_len: 256
    seed: 0
train:
  seed: 0
  device: cpu
  dtype: float32
  threads: null
  prefetch_workers: null
  batch_size: 64
  micro_batches: 1
  seq_len: 64
  tokens: 1000000
  epochs: null
  lr: 0.0003
  warmup_steps: 100
  schedule: inverse_sqrt
  beta1: 0.9
  beta2: 0.98
  eps: 1.0e-09
  expert_optimizer: auto
  clip_norm: 1.0
  log_every: 10
  dead_expert_window: 100
  checkpoint_every: 200
  keep_checkpoints: 2
  progress: auto
eval:
  split: test
  tokens: 100000
  batch_size: 32
  seq_len: 128
  at_tokens:
  - 1000
  - 2000
tracking:
  enabled: true
  uri: null
distributed:
  backend: auto
  replicate_noise: false
  timeout_s: 600
telemetry:
  interval_s: 1.0
  peak_flops: null
"""


def config(tmp_path, *more: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(FILE))
    return load_config([path], [*OVERRIDES, *more])


# --- round trip ----------------------------------------------------------------------------------


def test_config_yaml_is_the_dict_format_text_for_text(tmp_path):
    cfg = config(tmp_path)
    assert dump(cfg) == CONFIG_YAML
    assert cfg.to_dict() == yaml.safe_load(CONFIG_YAML)
    assert list(cfg.to_dict()) == list(yaml.safe_load(CONFIG_YAML))  # section order too


def test_yaml_to_config_to_dict_round_trips(tmp_path):
    cfg = config(tmp_path)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and dump(again) == CONFIG_YAML
    written = tmp_path / "config.yaml"
    written.write_text(dump(cfg))
    # a file is read as --set values are: its integral floats (zipf_s: 1.0) become equal ints
    assert load_config([written]) == cfg
    assert RunConfig.from_dict({}) == RunConfig() == load_config()


def test_print_config_prints_the_dump(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(FILE))
    args = ["train", "--print-config", "--config", str(path)]
    assert main([*args, *[a for o in OVERRIDES for a in ("--set", o)]]) == 0
    assert capsys.readouterr().out == CONFIG_YAML


def test_sections_hold_typed_values(tmp_path):
    cfg = config(tmp_path)
    assert cfg.model.lstm_layers == ((64, None),) and cfg.eval.at_tokens == (1000, 2000)
    assert (
        isinstance(cfg.data.synthetic, TopicMarkovConfig) and cfg.data.synthetic.vocab_size == 128
    )
    assert cfg.train.tokens_per_step == 64 * 64
    model = cfg.model.resolve(vocab_size=201)
    assert model == model_config(cfg, 201) and model.lstm_layers == ((64, None),)
    assert model.name == "MoE-256-h" and model.vocab_size == 201
    # a config.yaml read back as a plain dict resolves to the same model
    assert model_config(yaml.safe_load(CONFIG_YAML), 201) == model


def test_model_section_overrides_every_model_config_field_but_the_vocabulary():
    names = [f.name for f in dataclasses.fields(ModelSection)]
    assert names[0] == "preset" and tuple(names[1 : 1 + len(MODEL_FIELDS)]) == MODEL_FIELDS
    assert set(MODEL_FIELDS) == set(FLAT_KEYS) - {"vocab_size"}


def test_a_new_expert_count_renames_the_model():
    cfg = load_config(
        [],
        [
            "model.preset=cpu/MoE-256-h",
            "model.num_experts=64",
            "model.num_groups=8",
            "model.group_size=8",
        ],
    )
    assert cfg.model.resolve(577).name == "MoE-64-h"


# --- files and --set -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("train.tokens=1e6", "train.tokens", 1_000_000),  # YAML 1.1 reads 1e6 as a string
        ("train.lr=3e-4", "train.lr", 3e-4),
        ("train.lr=0.5", "train.lr", 0.5),
        ("model.dropout=0.0", "model.dropout", 0),  # integral floats become ints
        ("eval.at_tokens=[1e3, 2.0e3]", "eval.at_tokens", (1000, 2000)),
        ("model.sparse_grad=true", "model.sparse_grad", True),
        ("model.sparse_grad=null", "model.sparse_grad", None),
        ("train.threads=", "train.threads", None),  # an empty value is null
        ("name= my run ", "name", "my run"),
        ("train.device=cuda:1", "train.device", "cuda:1"),
        ("data.synthetic.eos_prob=0.125", "data.synthetic.eos_prob", 0.125),
        (" train.seed =3", "train.seed", 3),
    ],
)
def test_set_parses_values_as_yaml(item, key, value):
    node = load_config([], [item])
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value and type(node) is type(value)


def test_later_files_and_overrides_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"train": {"lr": 0.5, "batch_size": 4}, "sweep": "a"}))
    b.write_text(yaml.safe_dump({"train": {"lr": 0.25}}))
    cfg = load_config([a, b], ["train.batch_size=2"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.sweep) == (0.25, 2, "a")
    # only the result is validated: a file may leave a setting that a later override completes
    a.write_text(yaml.safe_dump({"train": {"tokens": None}}))
    cfg = load_config([a], ["data.corpus=text", "data.path=d", "train.epochs=1"])
    assert cfg.train.epochs == 1 and cfg.train.tokens is None


@pytest.mark.parametrize(
    ("files", "overrides", "message"),
    [
        ([], ["train"], r"^--set expects key=value, got 'train'$"),
        ([], ["=3"], r"^--set expects key=value"),
        (
            [],
            ["lr=1"],
            r"^unknown config key 'lr'; valid keys at the top level: data, distributed, "
            r"eval, experiment, model, name, sweep, telemetry, tracking, train$",
        ),
        (
            [],
            ["train.lrr=1"],
            r"^unknown config key 'train\.lrr'; valid keys in 'train': batch_size,",
        ),
        (
            [],
            ["data.synthetic.topics=3"],
            r"^unknown config key 'data\.synthetic\.topics'; valid keys in 'data\.synthetic': eos_prob, "
            r"fanout, max_len, num_clusters, num_topics, row_beta, seed, shared_fanout, vocab_size, "
            r"zipf_s$",
        ),
        ([], ["train=5"], r"^config key 'train' must be a mapping, got 5$"),
        (
            [],
            ["data.synthetic=[1]"],
            r"^config key 'data\.synthetic' must be a mapping, got \[1\]$",
        ),
        (["missing.yaml"], [], r"^config file 'missing\.yaml' does not exist$"),
    ],
)
def test_bad_keys_and_files_are_named(tmp_path, monkeypatch, files, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_config(files, overrides)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' is not valid YAML"):
        load_config([bad])
    bad.write_text("- 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' must hold a mapping of sections"):
        load_config([bad])


# --- validation: every section names its keys ----------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: ModelSection(dropout=1.0),
            r"^model\.dropout must be a finite number >= 0\.0 and < 1\.0, got 1\.0$",
        ),
        (
            lambda: ModelSection(w_load=-0.1),
            r"^model\.w_load must be a finite number >= 0\.0, got -0\.1$",
        ),
        (
            lambda: ModelSection(noisy_gating="yes"),
            r"^model\.noisy_gating must be true or false, got 'yes'$",
        ),
        (
            lambda: ModelSection(sparse_grad=2),
            r"^model\.sparse_grad must be true, false or null, got 2$",
        ),
        (
            lambda: ModelSection(lstm_layers=[[16]]),
            r"^model\.lstm_layers must be a list of \[units, projection",
        ),
        (
            lambda: ModelSection(preset="cpu/MoE-7"),
            r"^model\.preset 'cpu/MoE-7' is not a preset; valid: ",
        ),
        (
            lambda: ModelSection(k=40),
            r"^model \(cpu/MoE-32 with \{'k': 40\}\): k=40 must be <= num_experts=32$",
        ),
        (
            lambda: DataSection(corpus="wiki"),
            r"^data\.corpus must be one of \['synthetic', 'lm1b', 'text'\], got 'wiki'$",
        ),
        (lambda: DataSection(min_count=0), r"^data\.min_count must be a positive integer, got 0$"),
        (lambda: DataSection(max_vocab=0), r"^data\.max_vocab must be a positive integer, got 0$"),
        (lambda: DataSection(cache_dir=5), r"^data\.cache_dir must be a string, got 5$"),
        (lambda: DataSection(corpus="lm1b"), r"^data\.path is required for data\.corpus='lm1b'$"),
        (lambda: TrainSection(lr=0), r"^train\.lr must be a finite number > 0\.0, got 0$"),
        (
            lambda: TrainSection(beta2=1.0),
            r"^train\.beta2 must be a finite number >= 0\.0 and < 1\.0, got 1\.0$",
        ),
        (
            lambda: TrainSection(batch_size=True),
            r"^train\.batch_size must be a positive integer, got True$",
        ),
        (
            lambda: TrainSection(clip_norm=float("nan")),
            r"^train\.clip_norm must be a finite number > 0\.0, got nan$",
        ),
        (
            lambda: TrainSection(warmup_steps=-1),
            r"^train\.warmup_steps must be an integer >= 0, got -1$",
        ),
        (
            lambda: TrainSection(epochs=2),
            r"^set exactly one of train\.tokens and train\.epochs, got tokens=4000000, epochs=2$",
        ),
        (
            lambda: TrainSection(device="tpu"),
            r"^train\.device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'$",
        ),
        (
            lambda: TrainSection(schedule="cosine"),
            r"^train\.schedule must be one of \['inverse_sqrt', 'constant'\], got 'cosine'$",
        ),
        (
            lambda: EvalSection(split="dev"),
            r"^eval\.split must be one of \['test', 'valid'\], got 'dev'$",
        ),
        (lambda: EvalSection(tokens=0), r"^eval\.tokens must be a positive integer, got 0$"),
        (
            lambda: EvalSection(at_tokens=[0]),
            r"^eval\.at_tokens must be a list of positive integers, got \[0\]$",
        ),
        (lambda: TrackingSection(enabled=1), r"^tracking\.enabled must be true or false, got 1$"),
        (lambda: TrackingSection(uri=5), r"^tracking\.uri must be a string, got 5$"),
        (
            lambda: DistributedSection(backend="mpi"),
            r"^distributed\.backend must be one of \['auto', 'nccl', 'gloo'\], got 'mpi'$",
        ),
        (
            lambda: DistributedSection(timeout_s=0),
            r"^distributed\.timeout_s must be a finite number > 0\.0, got 0$",
        ),
        (
            lambda: DistributedSection(replicate_noise="no"),
            r"^distributed\.replicate_noise must be true or false, got 'no'$",
        ),
        (
            lambda: TelemetrySection(interval_s=-1),
            r"^telemetry\.interval_s must be a finite number > 0\.0, got -1$",
        ),
        (
            lambda: TelemetrySection(peak_flops=float("inf")),
            r"^telemetry\.peak_flops must be a finite number > 0\.0, got inf$",
        ),
        (lambda: RunConfig(experiment=""), r"^experiment must be a non-empty string, got ''$"),
        (lambda: RunConfig(sweep=3), r"^sweep must be a string, got 3$"),
        (
            lambda: RunConfig(train=TrainSection(tokens=None, epochs=2)),
            r"^train\.epochs needs a finite corpus",
        ),
        (
            lambda: RunConfig(eval=EvalSection(tokens=None)),
            r"^eval\.tokens must be set for data\.corpus='synthetic'",
        ),
    ],
)
def test_every_section_names_the_key_and_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_synthetic_section_names_its_keys_from_the_top():
    with pytest.raises(
        ValueError,
        match=r"^data\.synthetic\.fanout=600 must be <= data\.synthetic\.vocab_size=512$",
    ):
        load_config([], ["data.synthetic.fanout=600"])
    with pytest.raises(
        ValueError, match=r"^data\.synthetic\.seed must be an integer >= 0, got -1$"
    ):
        load_config([], ["data.synthetic.seed=-1"])


def test_sections_validate_where_they_are_built():
    cfg = RunConfig()
    with pytest.raises(ValueError, match=r"^train\.lr must be"):
        dataclasses.replace(cfg.train, lr=-1.0)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5))
    assert changed.train.lr == 0.5 and cfg.train.lr == 0.01


# --- frozen ---------------------------------------------------------------------------------------


def test_configs_are_frozen_keyword_only_and_hashable(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelSection()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.synthetic.seed = 1
    with pytest.raises(TypeError):
        TrainSection(0)  # keyword-only
    assert hash(cfg) == hash(config(tmp_path))  # lists are held as tuples
