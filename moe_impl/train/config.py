"""The training config: defaults, YAML files, `--set key=value` overrides, validation, resolution.

A config is a nested dict with exactly the keys of DEFAULTS (an unknown key is an error that names
it and lists the valid ones). `load_config(files, overrides)` merges DEFAULTS <- each YAML file <-
each `key.path=value` override (values parsed as YAML: `3e-4`, `true`, `[1, 2]`, `null`) and checks
every value's type and range, so a bad value fails before any model is built. The resolved dict is
what `config.yaml` of a run directory holds; `model_config(cfg, vocab_size)` turns its `model`
section into the `flops.ModelConfig` the model and the accounting share.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import yaml

from moe_impl.data.synthetic import TopicMarkovConfig
from moe_impl.model.flops import ModelConfig
from moe_impl.model.presets import ALL_PRESETS

# ModelConfig fields a config may override on top of its preset (`model.num_experts=1024`);
# vocab_size always comes from the corpus.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size")

DEFAULTS: dict = {
    "name": None,  # run name (MLflow run name); default: the preset's model name
    "experiment": "moe",  # MLflow experiment
    "sweep": None,  # a label grouping runs (MLflow tag), e.g. "lm1b-style"
    "model": {
        "preset": "cpu/MoE-32",  # any `python -m moe_impl flops` name: cpu/..., lm1b/..., news100b/...
        **dict.fromkeys(MODEL_FIELDS),  # None = the preset's value
        # App. C.1 used 0.1-0.4 for 10 epochs over LM1B; a single pass over the endless synthetic
        # stream has nothing to regularise (see the README's sizing notes)
        "dropout": 0.0,
        "w_importance": 0.1,  # App. C.1: w_importance = w_load = 0.1
        "w_load": 0.1,
        "noisy_gating": True,
        "sparse_grad": None,  # None: sparse expert gradients from 4096 experts on
    },
    "data": {
        "corpus": "synthetic",  # synthetic | lm1b | text
        "path": None,  # lm1b: the archive folder; text: the folder with train/valid/test files
        "vocab_file": None,  # lm1b: vocab-2016-09-10.txt or 1b_word_vocab.txt (default: found)
        "cache_dir": None,  # lm1b: where encoded shards are cached (default: beside the data)
        "max_train_shards": None,  # lm1b: use only the first N training shards
        "min_count": 1,  # text: frequency cutoff of the vocabulary
        "max_vocab": None,  # text: keep at most this many words
        "synthetic": {f.name: f.default for f in dataclasses.fields(TopicMarkovConfig)},
    },
    "train": {
        "seed": 0,
        "device": "cpu",  # cpu | cuda | cuda:N
        "dtype": "float32",  # float32 | bfloat16 (autocast; gate logits stay float32)
        "threads": None,  # CPU threads; None = all cores
        "batch_size": 64,  # rows per step
        "seq_len": 64,  # time steps per row (truncated back-propagation length)
        "tokens": 4_000_000,  # training positions (batch_size · seq_len per step); or null
        "epochs": None,  # finite corpora: passes over the training data (instead of tokens)
        "lr": 0.01,  # peak learning rate
        "warmup_steps": 100,  # App. C.1: linear warmup (1000 steps there), then ∝ 1/√step
        "schedule": "inverse_sqrt",  # inverse_sqrt | constant (after warmup)
        "beta1": 0.9,
        "beta2": 0.98,
        "eps": 1e-9,
        "expert_optimizer": "auto",  # adam | factored (App. D) | auto: factored iff sparse grads
        "clip_norm": 1.0,  # global gradient-norm clipping; null = none
        "log_every": 10,  # steps between progress lines and tracked metrics
        "checkpoint_every": 200,  # steps between checkpoints (and at the end)
        "keep_checkpoints": 2,
        "progress": "auto",  # auto (a bar in a terminal, lines in logs) | bar | lines | none
    },
    "eval": {
        "split": "test",  # the summary's split: test (the paper's heldout) | valid
        "tokens": 100_000,  # scored tokens per evaluation (required for the endless synthetic)
        "batch_size": 32,
        "seq_len": 128,
        "at_tokens": [],  # extra snapshots after these many training tokens (Fig. 3: N, 10N)
    },
    "tracking": {
        "enabled": True,  # log to MLflow too (the run directory is written either way, first)
        "uri": None,  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/results/mlflow.db
    },
    "distributed": {
        # used when the run is launched with several processes (torchrun, or the workflow's SLURM
        # profile): the experts are sharded over the ranks and train.batch_size rows (the global
        # batch) are split among them (moe_impl/parallel, README "Cluster")
        "backend": "auto",  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
        "replicate_noise": False,  # every rank draws the whole batch's gate noise and softmax
        # samples and keeps its rows: with model.dropout=0 the run then equals the one-process run
        "timeout_s": 600,  # collective timeout (seconds)
    },
    "telemetry": {
        "interval_s": 1.0,  # GPU (NVML) sampling interval
        "peak_flops": None,  # device peak FLOP/s for MFU; None: the device table (GPU) or a
        # measured GEMM (CPU); an unknown GPU gives MFU = NaN, never a guess
    },
}

_CHOICES = {
    "data.corpus": ("synthetic", "lm1b", "text"),
    "train.dtype": ("float32", "bfloat16"),
    "train.schedule": ("inverse_sqrt", "constant"),
    "train.expert_optimizer": ("auto", "adam", "factored"),
    "train.progress": ("auto", "bar", "lines", "none"),
    "eval.split": ("test", "valid"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}
_POSITIVE_INTS = (
    "train.batch_size", "train.seq_len", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "eval.batch_size", "eval.seq_len",
)  # fmt: skip
_OPTIONAL_POSITIVE_INTS = (
    "train.tokens", "train.epochs", "train.threads", "eval.tokens", "data.max_train_shards",
    "data.max_vocab",
)  # fmt: skip


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> dict:
    """DEFAULTS <- YAML files <- `key=value` overrides, validated (ValueError names the key)."""
    cfg = copy.deepcopy(DEFAULTS)
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
        _merge(cfg, data, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(text) if text.strip() else None
        _merge(cfg, _nested(key.strip(), value), prefix="")
    validate(cfg)
    return cfg


def _nested(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(into: dict, new: dict, prefix: str) -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key not in into:
            where = f"in {prefix[:-1]!r}" if prefix else "at the top level"
            raise ValueError(
                f"unknown config key {name!r}; valid keys {where}: {', '.join(sorted(into))}"
            )
        if isinstance(into[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} must be a mapping, got {value!r}")
            _merge(into[key], value, prefix=f"{name}.")
        else:
            into[key] = _coerce(value)


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


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: dict) -> None:
    """Types and ranges of every setting; the model and corpus sections are checked by building
    them (ModelConfig, TopicMarkovConfig), with their messages prefixed by the section."""
    for key, choices in _CHOICES.items():
        if get(cfg, key) not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {get(cfg, key)!r}")
    for key in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        value = get(cfg, key)
        if value is None and key in _OPTIONAL_POSITIVE_INTS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if cfg["telemetry"]["peak_flops"] is not None:
        _check_number(
            "telemetry.peak_flops", cfg["telemetry"]["peak_flops"], low=0.0, low_open=True
        )
    _check_number("telemetry.interval_s", cfg["telemetry"]["interval_s"], low=0.0, low_open=True)
    for key in ("train.lr", "train.eps"):
        _check_number(key, get(cfg, key), low=0.0, low_open=True)
    for key in ("train.beta1", "train.beta2", "model.dropout"):
        _check_number(key, get(cfg, key), low=0.0, high=1.0)
    for key in ("model.w_importance", "model.w_load"):
        _check_number(key, get(cfg, key), low=0.0)
    if cfg["train"]["clip_norm"] is not None:
        _check_number("train.clip_norm", cfg["train"]["clip_norm"], low=0.0, low_open=True)
    warmup = cfg["train"]["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"train.warmup_steps must be an integer >= 0, got {warmup!r}")
    if (cfg["train"]["tokens"] is None) == (cfg["train"]["epochs"] is None):
        raise ValueError(
            "set exactly one of train.tokens and train.epochs, got "
            f"tokens={cfg['train']['tokens']!r}, epochs={cfg['train']['epochs']!r}"
        )
    if cfg["train"]["epochs"] is not None and cfg["data"]["corpus"] == "synthetic":
        raise ValueError("train.epochs needs a finite corpus; the synthetic one is endless")
    at = cfg["eval"]["at_tokens"]
    if not isinstance(at, list) or any(
        isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in at
    ):
        raise ValueError(f"eval.at_tokens must be a list of positive integers, got {at!r}")
    device = cfg["train"]["device"]
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"train.device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    _check_number("distributed.timeout_s", cfg["distributed"]["timeout_s"], low=0.0, low_open=True)
    for key in ("model.noisy_gating", "tracking.enabled", "distributed.replicate_noise"):
        if not isinstance(get(cfg, key), bool):
            raise ValueError(f"{key} must be true or false, got {get(cfg, key)!r}")
    if cfg["model"]["sparse_grad"] not in (None, True, False):
        raise ValueError(
            f"model.sparse_grad must be true, false or null, got {cfg['model']['sparse_grad']!r}"
        )
    seed = cfg["train"]["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"train.seed must be an integer >= 0, got {seed!r}")
    for key in ("data.path", "data.vocab_file", "data.cache_dir", "tracking.uri", "name", "sweep"):
        if get(cfg, key) is not None and not isinstance(get(cfg, key), str):
            raise ValueError(f"{key} must be a string, got {get(cfg, key)!r}")
    if not isinstance(cfg["experiment"], str) or not cfg["experiment"]:
        raise ValueError(f"experiment must be a non-empty string, got {cfg['experiment']!r}")
    layers = cfg["model"]["lstm_layers"]
    if layers is not None and not (
        isinstance(layers, list)
        and all(
            isinstance(layer, list)
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
    if not isinstance(cfg["model"]["preset"], str) or cfg["model"]["preset"] not in ALL_PRESETS:
        raise ValueError(
            f"model.preset {cfg['model']['preset']!r} is not a preset; valid: "
            + ", ".join(ALL_PRESETS)
        )
    if cfg["data"]["corpus"] == "synthetic":
        synthetic_config(cfg)
        if cfg["eval"]["tokens"] is None:
            raise ValueError(
                "eval.tokens must be set for data.corpus='synthetic' (an endless stream has no "
                "end to evaluate to)"
            )
    elif cfg["data"]["path"] is None:
        raise ValueError(f"data.path is required for data.corpus={cfg['data']['corpus']!r}")
    model_config(cfg, vocab_size=10**9)  # structure only; the corpus fixes the vocabulary


def _check_number(key, value, *, low=None, high=None, low_open=False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"< {high}"
        raise ValueError(f"{key} must be a finite number {' and '.join(filter(None, [lo, hi]))}, "
                         f"got {value!r}")  # fmt: skip


def synthetic_config(cfg: dict) -> TopicMarkovConfig:
    try:
        return TopicMarkovConfig(**cfg["data"]["synthetic"])
    except ValueError as err:
        raise ValueError(str(err).replace("data.", "data.synthetic.", 1)) from None
    except TypeError as err:
        raise ValueError(f"data.synthetic: {err}") from None


def model_config(cfg: dict, vocab_size: int) -> ModelConfig:
    """The preset with the config's overrides and the corpus's vocabulary."""
    section = cfg["model"]
    changes = {k: section[k] for k in MODEL_FIELDS if section[k] is not None}
    if "lstm_layers" in changes:
        changes["lstm_layers"] = tuple(
            (int(units), None if proj is None else int(proj))
            for units, proj in changes["lstm_layers"]
        )
    preset = ALL_PRESETS[section["preset"]]
    kind = changes.get("moe", preset.moe)
    if "num_experts" in changes and kind in ("flat", "hierarchical"):
        changes["name"] = f"MoE-{changes['num_experts']}" + ("-h" if kind == "hierarchical" else "")
    try:
        return dataclasses.replace(preset, vocab_size=vocab_size, **changes)
    except ValueError as err:
        raise ValueError(
            f"model ({section['preset']} with {changes or 'no overrides'}): {err}"
        ) from None
    except TypeError as err:
        raise ValueError(f"model: {err}") from None


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
