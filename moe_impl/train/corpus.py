"""The corpus a run trains on, from its `data` section (moe_impl/data: synthetic, lm1b, text), and
this process's share of its batches.

An evaluation split with fewer scored tokens than `eval.tokens` asks for is scored whole, with one
warning line when the corpus opens (`eval_shortfall`; rank 0), before training: its perplexity
then rests on fewer tokens than the config says. summary.json's `eval_scored_tokens` (and each
eval record's `scored_tokens` in metrics.jsonl) records how many were scored."""

from __future__ import annotations

import sys

import numpy as np
import torch

from moe_impl.data.base import Batch
from moe_impl.data.stream import count_scored
from moe_impl.data.synthetic import TopicMarkov
from moe_impl.parallel.context import Context
from moe_impl.train.config import RunConfig, check_snapshots
from moe_impl.train.schedule import total_steps


def build_corpus(cfg: RunConfig):
    """The configured corpus, opened (LM1B and text read their vocabulary and held-out splits
    here), and eval.at_tokens checked against a budget of train.epochs, known only now."""
    corpus = _corpus(cfg)
    train = cfg.train
    if train.epochs is not None and cfg.eval.at_tokens:
        steps = total_steps(train, corpus)
        check_snapshots(
            cfg.eval.at_tokens,
            steps * train.tokens_per_step,
            f"train.epochs={train.epochs}, {steps} steps of {train.tokens_per_step} tokens",
        )
    return corpus


def _corpus(cfg: RunConfig):
    data = cfg.data
    if data.corpus == "synthetic":
        return TopicMarkov(data.synthetic)
    assert data.path is not None  # DataConfig requires it for lm1b and text
    if data.corpus == "lm1b":
        from moe_impl.data.lm1b import LM1BCorpus

        return LM1BCorpus(
            data.path,
            vocab_file=data.vocab_file,
            cache_dir=data.cache_dir,
            seed=cfg.train.seed,
            max_train_shards=data.max_train_shards,
        )
    from moe_impl.data.text import TextCorpus

    return TextCorpus(data.path, min_count=data.min_count, max_vocab=data.max_vocab)


def _encode(corpus, cfg: RunConfig):
    """`corpus` with the splits training reads encoded (and cached): a file that does not decode
    stops the run here, before its run directory is touched."""
    if hasattr(corpus, "stream"):  # real text
        for split in ("train", cfg.eval.split):
            corpus.stream(split)
    return corpus


def eval_shortfall(corpus, cfg: RunConfig) -> str | None:
    """The warning line for an eval.split that holds fewer scored tokens than eval.tokens asks for
    (every evaluation then scores all of them); None when it holds enough, eval.tokens is null
    (the whole split) or the corpus is endless (the synthetic one gives any number)."""
    asked, split = cfg.eval.tokens, cfg.eval.split
    if asked is None or not hasattr(corpus, "stream"):  # real text: one token stream per split
        return None
    scored = count_scored(corpus.stream(split), corpus.never_score)
    if scored >= asked:
        return None
    return (
        f"warning: the {split} split of the {corpus.name} corpus at {cfg.data.path} has {scored:,} "
        f"scored tokens, fewer than eval.tokens={asked}: every evaluation scores those "
        f"{scored:,} (summary.json records them as eval_scored_tokens)"
    )


def _open_main(cfg: RunConfig):
    """The corpus with its splits encoded (_encode), and eval_shortfall's warning printed."""
    corpus = _encode(build_corpus(cfg), cfg)
    warning = eval_shortfall(corpus, cfg)
    if warning is not None:
        print(warning, file=sys.stderr)
    return corpus


def open_corpus(cfg: RunConfig, ctx: Context, device: torch.device):
    """The corpus of this process, the splits training reads encoded. In a distributed run rank 0
    opens it first (and writes any cache, and warns of a short evaluation split), then the others
    read it, and a data error stops every rank, not only rank 0."""
    if not ctx.distributed:
        return _open_main(cfg)
    corpus, error = None, None
    if ctx.is_main:
        try:
            corpus = _open_main(cfg)
        except ValueError as err:
            error = err
    if not ctx.all_agree(error is None, device):
        raise error or ValueError("rank 0 could not open the corpus (its error says why)")
    return corpus if corpus is not None else build_corpus(cfg)


def local_rows(array: np.ndarray, ctx: Context) -> np.ndarray:
    """This process's share of a batch's rows (all of them on one process)."""
    rows, left = divmod(array.shape[0], ctx.world_size)
    if left:  # never drop rows silently (the corpora give full batches; this guards that)
        raise RuntimeError(
            f"a batch of {array.shape[0]} rows cannot be split over {ctx.world_size} processes"
        )
    return array[ctx.rank * rows : (ctx.rank + 1) * rows]


def local_batch(
    batch: Batch, ctx: Context, device: torch.device, *, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, scored) of this process's rows, as tensors on `device`. `pin` (a GPU
    fed by batch workers, train/prefetch.py): each array is copied into page-locked memory and
    on to the device without blocking, so the copy overlaps the host's work; the kernels that read
    the rows run after it on the same stream, and the caching host allocator keeps the pinned
    buffer until the copy is done."""

    def to(a):
        rows = torch.from_numpy(np.ascontiguousarray(local_rows(a, ctx)))
        if pin:
            return rows.pin_memory().to(device, non_blocking=True)
        return rows.to(device)

    return to(batch.inputs), to(batch.targets), to(batch.scored)
