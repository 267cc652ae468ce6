"""The run table of a workflow config: every run that moe_impl/runs/sweeps.py plans, resolved and
checked by the training's own config code (moe_impl.train.config), with what is read of it before
it runs: its overrides, corpus, model and size, the hash of its values and its host memory
estimate (moe_impl/runs/resources.py). The workflow's RUNS (workflow/rules/common.smk) is
`build_runs`; `python -m moe_impl plan` resolves each run with `resolve` too. Torch-free: the
workflow imports it while parsing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moe_impl.model.config import ModelConfig
from moe_impl.model.flops import total_params
from moe_impl.model.presets import ALL_PRESETS, LM1B_VOCAB
from moe_impl.runs import resources
from moe_impl.runs.sweeps import PlannedRun, planned_runs
from moe_impl.train import processes
from moe_impl.train.config import RunConfig, load_config, model_config
from moe_impl.train.identity import fingerprint


@dataclass(frozen=True)
class Run:
    """One planned run, resolved: `results/runs/<sweep>/<run>/`, trained from `preset` with the
    `--set` overrides; `config` is what `train` resolves them to, `fingerprint` a hash of its
    values (moe_impl/train/identity.py), `host_mem` the estimate of its host memory."""

    sweep: str
    run: str
    preset: str
    overrides: list[str]
    config: RunConfig
    model: ModelConfig
    params: int
    host_mem: resources.Estimate
    fingerprint: str

    @property
    def key(self) -> tuple[str, str]:
        return self.sweep, self.run

    @property
    def corpus(self) -> str:
        return self.config.data.corpus

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def mem_mb(self) -> int:
        """The scheduler's memory estimate of its job (Snakemake's mem_mb)."""
        return int(self.host_mem.value)

    @property
    def needs_cuda(self) -> bool:
        """It trains on a CUDA device (train.device cuda or cuda:N)."""
        return self.config.train.device.startswith("cuda")

    @property
    def batch_sizes(self) -> dict[str, int]:
        """The rows of its batches, which its processes share (moe_impl/train/processes.py)."""
        return {
            "train.batch_size": self.config.train.batch_size,
            "eval.batch_size": self.config.eval.batch_size,
        }


def run_model(cfg: RunConfig, preset: str) -> ModelConfig:
    """The run's model before its corpus is opened: the corpus fixes the real vocabulary, so it is
    LM1B's on LM1B (any preset: the paper's news100b/ ones there, gpu/ with data_path), else the
    preset's (made for its corpus)."""
    vocab = LM1B_VOCAB if cfg.data.corpus == "lm1b" else ALL_PRESETS[preset].vocab_size
    return model_config(cfg, vocab_size=vocab)


def resolve(planned: PlannedRun, train_config: str | Path, peaks: dict) -> Run:
    """A planned run resolved by the training's config code from the training config file
    `train_config` and its overrides (ValueError naming the bad key or value); `peaks` is
    peak_memory.yaml (resources.load), read for its host memory."""
    cfg = load_config([train_config], planned.overrides)
    model = run_model(cfg, planned.preset)
    params = total_params(model)
    per_pass = cfg.train.tokens_per_step // cfg.train.micro_batches  # one forward pass's positions
    host = resources.train_mem_mb(
        peaks,
        planned.preset,
        params=params,
        num_experts=model.num_experts,
        tokens_per_pass=per_pass,
    )
    return Run(*planned, cfg, model, params, host, fingerprint(cfg))


def build_runs(config: Mapping, peaks: dict, root: str | Path = ".") -> dict[tuple[str, str], Run]:
    """{(sweep, run): Run} of every run of every selected sweep of a workflow config, in config
    order, each checked as it is planned: resolved (`resolve`; the training config is
    config["train_config"], relative to `root`), and its batches divisible among the processes
    the workflow starts for it (processes.py). A ValueError names the config entry."""
    train_config = Path(root) / config["train_config"]
    world, who = processes.per_run(config), processes.named(config)
    runs: dict[tuple[str, str], Run] = {}

    def check(planned: PlannedRun) -> None:
        run = resolve(planned, train_config, peaks)
        processes.check_divisible(run.batch_sizes, world, who)
        runs[run.key] = run

    planned_runs(config, check=check)
    return runs
