"""The training regime of a run beside the paper's: how many positions each step scores, how many of
them each expert sees, how many training tokens there are per parameter, and how many steps.

The paper's gains from more experts depend on this regime. Sec. 3.1 ("The Shrinking Batch
Problem"): with n experts and k active per token, a batch of b positions gives each expert about
k·b/n of them, so the paper trains on very large batches; its budgets are
  - 1-Billion-Word (App. C.1): batches of about 300,000 words, 10 epochs = 27,000 steps, so about
    300,000 × 27,000 = 8.1B training tokens;
  - 100-Billion-Word Google News (App. D): batches of about 2.5 million words, one pass over 100B
    words, so about 40,000 steps.
Which of the two a run stands for is its sweep's name (`news100b`: App. D, any other: App. C.1), and
the paper model it stands for is the preset `<lm1b|news100b>/<printed name>` in
moe_impl.model.presets (the scaled families' baselines named after the paper's, `PAPER_NAME`). The
paper's values are computed from that preset (its parameters excluding embedding and softmax, as
Tables 7 and 8 print them) and the budget above, never typed in.

Plain Python, no torch: `regime` is what summary.json's "regime" holds (moe_impl/train/summary.py).
"""

from __future__ import annotations

from typing import NamedTuple

from moe_impl.model import flops
from moe_impl.model.config import ModelConfig
from moe_impl.model.presets import PRESETS

# The scaled families' models named otherwise than the paper's rows they stand for: the
# compute-matched baselines (Table 7, App. C.1: 4xLSTM-512 and LSTM-2048-512 at d = 512) and Fig.
# 2-right's largest budgets (Table 7, App. C.2); the other models keep the paper's names. The CPU
# family's LSTM-512-128 (~4x the base budget) has no paper row: the paper's LSTM line has none there.
PAPER_NAME = {
    "4xLSTM-64": "4xLSTM-512",  # cpu/
    "LSTM-256-64": "LSTM-2048-512",
    "LSTM-2048-128": "2xLSTM-8192-1024",  # ~16x the base budget, as 151M / 9.4M ops
    "MoE-0.5M": "MoE-34M",
    "MoE-2.2M": "MoE-143M",
    "4xLSTM-256": "4xLSTM-512",  # gpu/
    "LSTM-1024-256": "LSTM-2048-512",
}


class PaperRegime(NamedTuple):
    """One of the paper's training budgets: positions per step and optimizer steps."""

    corpus: str  # the preset prefix of its models, "lm1b" or "news100b"
    batch_positions: int
    steps: int

    @property
    def train_tokens(self) -> int:
        return self.batch_positions * self.steps


# App. C.1: batches of roughly 300,000 words, 10 epochs (27,000 steps)
LM1B_REGIME = PaperRegime("lm1b", 300_000, 27_000)
# App. D: batches of about 2.5 million words; 100B words in about 40,000 steps
NEWS100B_REGIME = PaperRegime("news100b", 2_500_000, 40_000)
NEWS100B_SWEEP = "news100b"  # the sweep name that stands for App. D (config/*.yaml)


def paper_regime(sweep: str | None) -> PaperRegime:
    """App. D's budget for the `news100b` sweep, App. C.1's for any other (or none)."""
    return NEWS100B_REGIME if sweep == NEWS100B_SWEEP else LM1B_REGIME


def paper_preset(model_name: str, sweep: str | None) -> str | None:
    """The paper preset a model of this name stands for in this sweep (`lm1b/MoE-256-h`,
    `news100b/4xLSTM-512` for 4xLSTM-64 in news100b), or None where the paper has no such row."""
    name = f"{paper_regime(sweep).corpus}/{PAPER_NAME.get(model_name, model_name)}"
    return name if name in PRESETS else None


def experts_per_token(model: ModelConfig) -> int | None:
    """Experts each position goes through: k (flat), k_primary·k_secondary (hierarchical), 1 for
    the one always-active expert (MoE-1-Wide, MoE-1-Deep); None without an MoE layer."""
    if model.moe == "flat":
        return model.k
    if model.moe == "hierarchical":
        assert model.k_primary is not None and model.k_secondary is not None  # checked when built
        return model.k_primary * model.k_secondary
    if model.moe == "dense":
        return 1
    return None


def tokens_per_expert_per_step(model: ModelConfig, batch_positions: int) -> float | None:
    """Sec. 3.1: the positions an expert receives per step on average, b·k/n (None without MoE)."""
    k = experts_per_token(model)
    return None if k is None else batch_positions * k / model.num_experts


def tokens_per_parameter(model: ModelConfig, train_tokens: int) -> float:
    """Training tokens per parameter excluding embedding and softmax (Tables 7, 8's #Parameters)."""
    return train_tokens / flops.params_excl_embedding_softmax(model)


def regime(model: ModelConfig, *, tokens_per_step: int, steps: int, sweep: str | None) -> dict:
    """summary.json's "regime" of a run that trained `steps` optimizer steps of `tokens_per_step`
    positions (the global batch, all processes): its own numbers, then the paper's for the model it
    stands for (`paper_preset`, None where there is none; then every paper_* value is None)."""
    out = {
        "batch_positions": tokens_per_step,
        "experts_per_token": experts_per_token(model),
        "tokens_per_expert_per_step": tokens_per_expert_per_step(model, tokens_per_step),
        "tokens_per_parameter": tokens_per_parameter(model, steps * tokens_per_step),
        "steps": steps,
    }
    preset = paper_preset(model.name, sweep)
    paper = paper_regime(sweep)
    if preset is None:
        keys = ("batch_positions", "tokens_per_expert_per_step", "tokens_per_parameter", "steps")
        values = dict.fromkeys(keys)
    else:
        values = {
            "batch_positions": paper.batch_positions,
            "tokens_per_expert_per_step": tokens_per_expert_per_step(
                PRESETS[preset], paper.batch_positions
            ),
            "tokens_per_parameter": tokens_per_parameter(PRESETS[preset], paper.train_tokens),
            "steps": paper.steps,
        }
    return {**out, "paper_preset": preset, **{f"paper_{k}": v for k, v in values.items()}}
