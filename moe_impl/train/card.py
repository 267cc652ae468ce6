"""A run's card: what it is, in words a browser shows. The MLflow run name (`lm1b/MoE-32/seed1`),
a short description (the model, its experts, ops/timestep, the tokens, the paper's number for the
same model) and the corpus as a dataset (name, digest, source, profile).

The trainer writes the card into run.json (runinfo.CARD_KEY) before the first step; the tracker and
the importer (moe_impl.tracking) read it from there and never rebuild it, so a run tracked live and
the same run imported say the same. `ensure_card` builds it after the fact for a run directory made
before cards existed, from its config.yaml and summary.json. Pure: no torch, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from moe_impl.model import flops
from moe_impl.model.config import ModelConfig
from moe_impl.model.presets import PAPER_VALUES, PaperRow
from moe_impl.runs import rundir, runinfo
from moe_impl.train.config import RunConfig, load_config

DIGEST_CHARS = 12
# corpus facts that say where the data lies or what a run measured on it, not what it is: left
# out of the digest (summary.json's "corpus" adds the unigram perplexity of the evaluated tokens)
_NOT_IDENTITY = frozenset({"root", "cache_dir", "unigram_perplexity"})
# the paper's perplexity columns, in the order a description names them: (field, what it is)
_PAPER_PPL = (
    ("ppl_10_epochs", "after 10 epochs"),
    ("ppl_final", "converged"),
    ("ppl_10B_words", "after 10B words"),
    ("ppl_100B_words", "after 100B words"),
)


def run_card(cfg: RunConfig, model: ModelConfig, corpus: Mapping) -> dict:
    """{"display_name", "description", "dataset"} of a run: `cfg` its config, `model` the resolved
    ModelConfig, `corpus` the corpus's describe() (moe_impl/data)."""
    name = runinfo.display_name(cfg.name or model.name, cfg.sweep, cfg.train.seed)
    dataset = corpus_dataset(corpus)
    return {
        "display_name": name,
        "description": describe(name, cfg, model, dataset["name"]),
        "dataset": dataset,
    }


def describe(name: str, cfg: RunConfig, model: ModelConfig, corpus_name: str) -> str:
    """The run's description (Markdown, MLflow's run note): model, experts, ops/timestep, params,
    tokens, corpus and seed, then the paper's row for the same model where the paper has one."""
    budget = (
        f"{count(cfg.train.tokens)} training tokens"
        if cfg.train.tokens is not None
        else f"{cfg.train.epochs} epochs"
    )
    lines = [
        f"**{name}**: `{cfg.model.preset}`, {architecture(model)}; "
        f"{count(flops.ops_per_timestep(model))} ops/timestep, "
        f"{count(flops.params_excl_embedding_softmax(model))} parameters without embedding "
        f"and softmax; {budget} of {corpus_name}, batch {cfg.train.batch_size} × "
        f"{cfg.train.seq_len}, seed {cfg.train.seed}.",
    ]
    key, row = paper_row(cfg, model)
    lines.append("")
    if row is None:
        lines.append("The paper (arXiv 1701.06538) has no row for this model.")
    else:
        ppl = [f"{getattr(row, f)} {what}" for f, what in _PAPER_PPL if getattr(row, f)]
        lines.append(
            f"The paper's {row.row} ({row.source}, `{key}`): test perplexity "
            f"{', '.join(ppl) or 'not printed'}; {row.ops_M}M ops/timestep, "
            f"{row.params_M}M parameters without embedding and softmax."
        )
    return "\n".join(lines)


def count(n: int) -> str:
    """`2,048`, `131,584`, `4M`, `16.4M`: digits below a million, then millions to 3 figures."""
    return f"{n:,}" if n < 1_000_000 else f"{n / 1e6:.3g}M"


def architecture(model: ModelConfig) -> str:
    """`flat MoE, 32 experts, top-4`, `hierarchical MoE, 1024 experts (32 groups of 32), top-2 +
    2`, `dense FFN`, `LSTMs only`."""
    if model.moe == "flat":
        return f"flat MoE, {model.num_experts} experts, top-{model.k}"
    if model.moe == "hierarchical":
        return (
            f"hierarchical MoE, {model.num_experts} experts ({model.num_groups} groups of "
            f"{model.group_size}), top-{model.k_primary} + {model.k_secondary}"
        )
    if model.moe == "dense":
        return "one dense feed-forward expert"
    layers = " + ".join(
        f"LSTM {units}" + (f" (projection {proj})" if proj else "")
        for units, proj in model.lstm_layers
    )
    return f"no MoE layer, {layers}"


def paper_row(cfg: RunConfig, model: ModelConfig) -> tuple[str | None, PaperRow | None]:
    """The paper's printed row for this model (moe_impl.model.presets.PAPER_VALUES): the preset
    itself where it is a paper preset, else the model of the same name in the sweep's corpus
    (`news100b/MoE-32`), else in the 1-Billion-Word tables (`lm1b/MoE-32`); (None, None) where the
    paper has no such model."""
    for key in (cfg.model.preset, f"{cfg.sweep}/{model.name}", f"lm1b/{model.name}"):
        if key in PAPER_VALUES:
            return key, PAPER_VALUES[key]
    return None, None


def corpus_dataset(corpus: Mapping) -> dict:
    """The corpus as an MLflow dataset input: {"name", "digest", "source_type", "source",
    "profile"}. The digest hashes what the corpus is (its generator's parameters, or its files'
    sizes and vocabulary), not where it lies, so two runs on the same data share it."""
    facts = {k: v for k, v in corpus.items() if k not in _NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
    kind = str(corpus.get("corpus", "corpus"))
    if kind == "synthetic":
        name = (
            f"synthetic TopicMarkov ({corpus.get('num_topics')} topics, "
            f"vocabulary {corpus.get('vocab_size')})"
        )
        source_type = "code"
        source = {"generator": "moe_impl.data.synthetic:TopicMarkov", "seed": corpus.get("seed")}
    else:
        root = corpus.get("root")
        name = f"{kind} ({Path(root).name})" if root else kind
        source_type, source = "local", {"uri": Path(root).resolve().as_uri() if root else None}
    profile = {k: v for k, v in facts.items() if isinstance(v, int | float | str | bool)}
    return {
        "name": name,
        "digest": digest[:DIGEST_CHARS],
        "source_type": source_type,
        "source": json.dumps(source),
        "profile": json.dumps(profile, sort_keys=True),
    }


def ensure_card(run_dir: str | Path) -> dict | None:
    """The card of a run directory: run.json's, else built from its config.yaml and summary.json
    (a run made before cards existed) and written into run.json; None where the directory has
    neither (nothing to build it from)."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.RUN_FILE
    identity = rundir.read_json(path) if path.is_file() else {}
    if isinstance(identity.get(runinfo.CARD_KEY), dict):
        return identity[runinfo.CARD_KEY]
    summary = rundir.read_summary(run_dir) or {}
    corpus = summary.get("corpus")
    if not (run_dir / rundir.CONFIG_FILE).is_file() or not isinstance(corpus, dict):
        return None
    cfg = load_config([run_dir / rundir.CONFIG_FILE])
    card = run_card(cfg, cfg.model.resolve(int(corpus["vocab_size"])), corpus)
    if identity:
        rundir.write_json(path, {**identity, runinfo.CARD_KEY: card})
    return card
