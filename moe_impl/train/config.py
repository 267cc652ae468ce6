"""The run config of `python -m moe_impl train`: typed sections, YAML files, `--set` overrides.

A `RunConfig` nests one frozen, keyword-only dataclass per section: model, data (with its
synthetic sub-section, the corpus's own `TopicMarkovConfig`), train, eval, tracking, distributed,
telemetry. Each checks its values in `__post_init__`, so a bad value fails where it is built, before
any model is, with a ValueError naming the key as the user writes it (`train.lr`) and the value;
settings that span sections (a finite corpus for `train.epochs`, `eval.at_tokens` within
`train.tokens`) are checked by RunConfig.

`load_config(files, overrides)` layers the defaults <- each YAML file <- each `key.path=value`
override (values parsed as YAML: `3e-4`, `true`, `[1, 2]`, `null`; integral floats become ints) and
builds the RunConfig once, at the end; an unknown key is an error that names it and lists the valid
ones. `cfg.to_dict()` is the nested plain dict, every key in field order, that a run directory's
`config.yaml` holds (`dump`); `RunConfig.from_dict` reads it back. `cfg.model.resolve(vocab_size)`
is the `ModelConfig` the model and the accounting share (the corpus fixes the vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moe_impl.data.synthetic import TopicMarkovConfig
from moe_impl.layer.config import GATE_PRECISIONS, MoEConfig
from moe_impl.model.config import DEFAULT_DROPOUT, FLAT_KEYS, ModelConfig
from moe_impl.model.presets import ALL_PRESETS

# ModelConfig's flat keys a config may override on top of its preset (`model.num_experts=1024`);
# vocab_size always comes from the corpus.
MODEL_FIELDS = tuple(k for k in FLAT_KEYS if k != "vocab_size")
# how the model trains: ModelConfig's dropout and the gate's options (MoEConfig's fields)
TRAINING_FIELDS = (
    "dropout",
    "w_importance",
    "w_load",
    "noisy_gating",
    "sparse_grad",
    "gate_precision",
)

_STRUCTURE_VOCAB = 10**9  # checking a model section's structure before the corpus is known


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """`model`: a preset, overrides of its ModelConfig fields (None = the preset's value), and how
    the model trains. `lstm_layers` is written `[[units, projection or null], ...]`."""

    # any `python -m moe_impl flops` name: cpu/..., gpu/..., lm1b/..., news100b/...
    preset: str = "cpu/MoE-32"
    # overrides of the preset's ModelConfig, in its field order (MODEL_FIELDS)
    name: str | None = None
    d_model: int | None = None
    lstm_layers: tuple[tuple[int, int | None], ...] | None = None
    softmax_samples: int | None = None
    moe: str | None = None
    num_experts: int | None = None
    d_hidden: int | None = None
    expert_hidden_layers: int | None = None
    k: int | None = None
    num_groups: int | None = None
    group_size: int | None = None
    k_primary: int | None = None
    k_secondary: int | None = None
    # how the model trains; the defaults are the LM's and the layer's (MoEConfig)
    dropout: float = DEFAULT_DROPOUT
    w_importance: float = MoEConfig.w_importance
    w_load: float = MoEConfig.w_load
    noisy_gating: bool = MoEConfig.noisy_gating
    sparse_grad: bool | None = None  # None: sparse from SPARSE_GRAD_MIN_EXPERTS experts on
    gate_precision: str = MoEConfig.gate_precision  # the gate matmuls' (GATE_PRECISIONS)
    # the gates' routing and the experts' combine through torch.compile (MoELayer.compile_routing)
    compile: bool = False

    def __post_init__(self) -> None:
        _check_number("model.dropout", self.dropout, low=0.0, high=1.0)
        for key in ("w_importance", "w_load"):
            _check_number(f"model.{key}", getattr(self, key), low=0.0)
        _check_bool("model.noisy_gating", self.noisy_gating)
        _check_choice("model.gate_precision", self.gate_precision, GATE_PRECISIONS)
        _check_bool("model.compile", self.compile)
        if self.sparse_grad not in (None, True, False):
            raise ValueError(
                f"model.sparse_grad must be true, false or null, got {self.sparse_grad!r}"
            )
        layers = self.lstm_layers
        if layers is not None:
            if not (
                isinstance(layers, list | tuple)
                and all(
                    isinstance(layer, list | tuple)
                    and len(layer) == 2
                    and isinstance(layer[0], int)
                    and (layer[1] is None or isinstance(layer[1], int))
                    for layer in layers
                )
            ):
                raise ValueError(
                    "model.lstm_layers must be a list of [units, projection or null] pairs, e.g. "
                    f"[[64, null], [64, null]]; got {layers!r}"
                )
            object.__setattr__(self, "lstm_layers", tuple(tuple(layer) for layer in layers))
        if not isinstance(self.preset, str) or self.preset not in ALL_PRESETS:
            raise ValueError(
                f"model.preset {self.preset!r} is not a preset; valid: " + ", ".join(ALL_PRESETS)
            )
        self.resolve(_STRUCTURE_VOCAB)  # the structure; the corpus fixes the vocabulary

    def resolve(self, vocab_size: int) -> ModelConfig:
        """The preset with this section's overrides, how it trains, and the corpus's vocabulary."""
        overrides = {k: getattr(self, k) for k in MODEL_FIELDS}
        options = {k: getattr(self, k) for k in TRAINING_FIELDS}
        return resolve_model(self.preset, overrides, vocab_size, options)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """`data`: which corpus, where it is, and the synthetic corpus's parameters."""

    corpus: str = "synthetic"  # synthetic | lm1b | text
    path: str | None = None  # lm1b: the archive folder; text: the folder of train/valid/test
    vocab_file: str | None = None  # lm1b: vocab-2016-09-10.txt or 1b_word_vocab.txt (or found)
    cache_dir: str | None = None  # lm1b: where encoded shards are cached (default: by the data)
    max_train_shards: int | None = None  # lm1b: use only the first N training shards
    min_count: int = 1  # text: frequency cutoff of the vocabulary
    max_vocab: int | None = None  # text: keep at most this many words
    synthetic: TopicMarkovConfig = field(default_factory=TopicMarkovConfig)

    def __post_init__(self) -> None:
        _check_choice("data.corpus", self.corpus, ("synthetic", "lm1b", "text"))
        _check_positive_int("data.min_count", self.min_count)
        for key in ("max_train_shards", "max_vocab"):
            _check_positive_int(f"data.{key}", getattr(self, key), optional=True)
        for key in ("path", "vocab_file", "cache_dir"):
            _check_string(f"data.{key}", getattr(self, key))
        if self.corpus != "synthetic" and self.path is None:
            raise ValueError(f"data.path is required for data.corpus={self.corpus!r}")


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    """`train`: the device, the batches, the budget, the optimizer and its schedule, checkpoints."""

    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 (autocast; gate logits stay float32)
    threads: int | None = None  # CPU threads; None = all cores
    # processes that make training batches ahead of the step (train/prefetch.py; synthetic
    # corpus only); 0 = inline, between steps; None = 2 on CUDA, 0 on CPU
    prefetch_workers: int | None = None
    batch_size: int = 64  # rows per step
    # gradient accumulation: each step's rows in this many equal micro-batches, one forward and
    # backward each, then one update (docs/training.md#micro-batches); 1 = the whole batch at once
    micro_batches: int = 1
    seq_len: int = 64  # time steps per row (truncated back-propagation length)
    tokens: int | None = 4_000_000  # training positions (batch_size · seq_len per step); or null
    epochs: int | None = None  # finite corpora: passes over the training data (instead of tokens)
    lr: float = 0.01  # peak learning rate
    warmup_steps: int = 100  # App. C.1: linear warmup (1000 steps there), then ∝ 1/√step
    schedule: str = "inverse_sqrt"  # inverse_sqrt | constant (after warmup)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    expert_optimizer: str = "auto"  # adam | factored (App. D) | auto: factored iff sparse grads
    clip_norm: float | None = 1.0  # global gradient-norm clipping; null = none
    log_every: int = 10  # steps between progress lines and tracked metrics
    # dead_expert_fraction: the share of experts with no token in the last this many steps
    # (runs/expertstats.py); recorded only, the training is the same for every value
    dead_expert_window: int = 100
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    progress: str = "auto"  # auto (a bar in a terminal, lines in logs) | bar | lines | none

    def __post_init__(self) -> None:
        _check_choice("train.dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("train.schedule", self.schedule, ("inverse_sqrt", "constant"))
        _check_choice("train.expert_optimizer", self.expert_optimizer, ("auto", "adam", "factored"))
        _check_choice("train.progress", self.progress, ("auto", "bar", "lines", "none"))
        positive = (
            "batch_size",
            "micro_batches",
            "seq_len",
            "log_every",
            "dead_expert_window",
            "checkpoint_every",
            "keep_checkpoints",
        )
        for key in positive:
            _check_positive_int(f"train.{key}", getattr(self, key))
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be divisible by "
                f"train.micro_batches={self.micro_batches}: a step's rows are split into equal "
                "micro-batches"
            )
        for key in ("tokens", "epochs", "threads"):
            _check_positive_int(f"train.{key}", getattr(self, key), optional=True)
        if self.prefetch_workers is not None:
            _check_count("train.prefetch_workers", self.prefetch_workers)
        for key in ("lr", "eps"):
            _check_number(f"train.{key}", getattr(self, key), low=0.0, low_open=True)
        for key in ("beta1", "beta2"):
            _check_number(f"train.{key}", getattr(self, key), low=0.0, high=1.0)
        if self.clip_norm is not None:
            _check_number("train.clip_norm", self.clip_norm, low=0.0, low_open=True)
        _check_count("train.warmup_steps", self.warmup_steps)
        if (self.tokens is None) == (self.epochs is None):
            raise ValueError(
                "set exactly one of train.tokens and train.epochs, got "
                f"tokens={self.tokens!r}, epochs={self.epochs!r}"
            )
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _check_count("train.seed", self.seed)

    @property
    def tokens_per_step(self) -> int:
        """Training positions per step (the global batch)."""
        return self.batch_size * self.seq_len


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """`eval`: the split the summary reports, how much of it, and snapshots during training."""

    split: str = "test"  # the summary's split: test (the paper's heldout) | valid
    tokens: int | None = 100_000  # scored tokens per evaluation (needed by the endless synthetic)
    batch_size: int = 32
    seq_len: int = 128
    at_tokens: tuple[int, ...] = ()  # extra snapshots after these many training tokens (Fig. 3)

    def __post_init__(self) -> None:
        _check_choice("eval.split", self.split, ("test", "valid"))
        for key in ("batch_size", "seq_len"):
            _check_positive_int(f"eval.{key}", getattr(self, key))
        _check_positive_int("eval.tokens", self.tokens, optional=True)
        at = self.at_tokens
        if not isinstance(at, list | tuple) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in at
        ):
            raise ValueError(f"eval.at_tokens must be a list of positive integers, got {at!r}")
        object.__setattr__(self, "at_tokens", tuple(at))


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    """`tracking`: MLflow (the run directory is written either way, first)."""

    enabled: bool = True
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/results/mlflow.db

    def __post_init__(self) -> None:
        _check_bool("tracking.enabled", self.enabled)
        _check_string("tracking.uri", self.uri)


@dataclass(frozen=True, kw_only=True)
class DistributedSection:
    """`distributed`: used when the run is launched with several processes (torchrun, or the
    workflow's SLURM profile): the experts are sharded over the ranks and train.batch_size rows (the
    global batch) are split among them (moe_impl/parallel, docs/parallel.md)."""

    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
    # every rank draws the whole batch's gate noise and softmax samples and keeps its rows: with
    # model.dropout=0 the run then equals the one-process run
    replicate_noise: bool = False
    timeout_s: float = 600  # collective timeout (seconds)

    def __post_init__(self) -> None:
        _check_choice("distributed.backend", self.backend, ("auto", "nccl", "gloo"))
        _check_number("distributed.timeout_s", self.timeout_s, low=0.0, low_open=True)
        _check_bool("distributed.replicate_noise", self.replicate_noise)


@dataclass(frozen=True, kw_only=True)
class TelemetrySection:
    """`telemetry`: GPU sampling and the peak FLOP/s that MFU divides by."""

    interval_s: float = 1.0  # GPU (NVML) sampling interval
    # device peak FLOP/s for MFU; None: the device table (GPU) or a measured GEMM (CPU); an unknown
    # GPU gives MFU = NaN, never a guess
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.peak_flops is not None:
            _check_number("telemetry.peak_flops", self.peak_flops, low=0.0, low_open=True)
        _check_number("telemetry.interval_s", self.interval_s, low=0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run: its names and every section."""

    name: str | None = None  # run name (MLflow run name); default: the preset's model name
    experiment: str = "moe"  # MLflow experiment
    sweep: str | None = None  # a label grouping runs (MLflow tag), e.g. "lm1b-style"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)

    def __post_init__(self) -> None:
        for key in ("name", "sweep"):
            _check_string(key, getattr(self, key))
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(f"experiment must be a non-empty string, got {self.experiment!r}")
        if self.train.tokens is not None:
            check_snapshots(
                self.eval.at_tokens, self.train.tokens, f"train.tokens={self.train.tokens}"
            )
        if self.data.corpus == "synthetic":
            if self.train.epochs is not None:
                raise ValueError("train.epochs needs a finite corpus; the synthetic one is endless")
            if self.eval.tokens is None:
                raise ValueError(
                    "eval.tokens must be set for data.corpus='synthetic' (an endless stream has "
                    "no end to evaluate to)"
                )

    @classmethod
    def from_dict(cls, values: Mapping) -> RunConfig:
        """The inverse of `to_dict`: nested sections, values taken as they are (load_config parses
        and coerces what users write); keys left out take their defaults."""
        raw: dict = {}
        _merge(raw, values, cls, prefix="", coerce=False)
        return _build(cls, raw, prefix="")

    def to_dict(self) -> dict:
        """Every key, nested by section in field order, as plain YAML/JSON values (lists)."""
        return _plain(self)


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML files <- `key=value` overrides, validated (ValueError names the key)."""
    raw: dict = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
        _merge(raw, data, RunConfig, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(text) if text.strip() else None
        _merge(raw, _nested(key.strip(), value), RunConfig, prefix="")
    return _build(RunConfig, raw, prefix="")


def check_snapshots(at_tokens: tuple[int, ...], budget_tokens: int, budget: str) -> None:
    """ValueError for eval.at_tokens beyond the training budget: snapshots are taken during
    training, so one after its end would silently never be. RunConfig checks it against
    train.tokens; with train.epochs the budget is known once the corpus is open (train/corpus.py)."""
    beyond = [t for t in at_tokens if t > budget_tokens]
    if beyond:
        raise ValueError(
            f"eval.at_tokens={list(at_tokens)}: {', '.join(map(str, beyond))} is beyond the "
            f"training budget, {budget}; no snapshot would be taken there (lower it, or train "
            "longer)"
        )


def dump(cfg: RunConfig) -> str:
    """The YAML text of a run directory's config.yaml (and of --print-config)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def model_config(cfg: RunConfig | Mapping, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig: `cfg.model.resolve(vocab_size)`. A plain dict (a config.yaml read
    back) works too: its `model` section's preset, overrides and training options are read (those
    it lacks take their defaults)."""
    if isinstance(cfg, RunConfig):
        return cfg.model.resolve(vocab_size)
    section = cfg["model"]
    overrides = {k: section.get(k) for k in MODEL_FIELDS}
    options = {k: section[k] for k in TRAINING_FIELDS if section.get(k) is not None}
    return resolve_model(section["preset"], overrides, vocab_size, options)


def resolve_model(
    preset: str, overrides: Mapping, vocab_size: int, options: Mapping | None = None
) -> ModelConfig:
    """ALL_PRESETS[preset] with the overrides of its flat form that are not None (a new expert
    count renames a flat or hierarchical model, `MoE-1024-h`) and how it trains, `options`
    (TRAINING_FIELDS; the defaults where not given). ValueError names the preset and the overrides."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "lstm_layers" in changes:
        changes["lstm_layers"] = tuple(
            (int(units), None if proj is None else int(proj))
            for units, proj in changes["lstm_layers"]
        )
    base = ALL_PRESETS[preset]
    kind = changes.get("moe", base.moe)
    if "num_experts" in changes and kind in ("flat", "hierarchical"):
        changes["name"] = f"MoE-{changes['num_experts']}" + ("-h" if kind == "hierarchical" else "")
    try:
        return base.replace(vocab_size=vocab_size, **changes, **(options or {}))
    except (ValueError, TypeError) as err:  # TypeError: a value of the wrong type met an operator
        defaults = {f.name: f.default for f in dataclasses.fields(ModelSection)}
        given = {**changes, **{k: v for k, v in (options or {}).items() if v != defaults[k]}}
        raise ValueError(f"model ({preset} with {given or 'no overrides'}): {err}") from None


# --- building a RunConfig from nested mappings ---------------------------------------------------


def _sections(cls: type) -> dict[str, type]:
    """The fields of `cls` that are sections of their own: {name: their dataclass}."""
    return {
        f.name: f.default_factory  # type: ignore[misc]  # a dataclass: checked below
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(f.default_factory)
    }


def _merge(into: dict, new: Mapping, cls: type, prefix: str, *, coerce: bool = True) -> None:
    """Lay `new` over `into` (what the user set so far), checking each key against `cls`'s fields;
    values are coerced as `_coerce` says (or taken as they are)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    sections = _sections(cls)
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in valid:
            where = f"in {prefix[:-1]!r}" if prefix else "at the top level"
            raise ValueError(
                f"unknown config key {name!r}; valid keys {where}: {', '.join(sorted(valid))}"
            )
        if key in sections:
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} must be a mapping, got {value!r}")
            _merge(into.setdefault(key, {}), value, sections[key], f"{name}.", coerce=coerce)
        else:
            into[key] = _coerce(value) if coerce else value


def _build(cls: type, values: dict, prefix: str):
    """`cls` from merged values, its sections first, in field order (keys not set take their
    defaults)."""
    sections = _sections(cls)
    kwargs = {
        f.name: _build(sections[f.name], values[f.name], f"{prefix}{f.name}.")
        if f.name in sections
        else values[f.name]
        for f in dataclasses.fields(cls)
        if f.name in values
    }
    if cls is not TopicMarkovConfig:
        return cls(**kwargs)
    # the corpus's own config names its keys data.X; in a run config they are data.synthetic.X
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(str(err).replace("data.", "data.synthetic.")) from None
    except TypeError as err:
        raise ValueError(f"data.synthetic: {err}") from None


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _nested(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value):
    """YAML 1.1 reads `3e-4` and `1e6` as strings; numbers they are. Integral floats become ints
    (`train.tokens=1e6`), lists are coerced element-wise."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    return value


# --- checks (ValueError naming the key and the value) --------------------------------------------


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(key: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_count(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _check_string(key: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")


def _check_number(key: str, value, *, low=None, high=None, low_open=False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"< {high}"
        raise ValueError(
            f"{key} must be a finite number {' and '.join(filter(None, [lo, hi]))}, got {value!r}"
        )
