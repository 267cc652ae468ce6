"""Corpora for the language-model experiments (the Corpus protocol of base.py): the embedded
synthetic TopicMarkov (the default), LM1B in its released layout, and plain text / WikiText."""

from moe_impl.data.lm1b import LM1BCorpus
from moe_impl.data.stream import eval_windows, train_windows
from moe_impl.data.synthetic import Batch, TopicMarkov, TopicMarkovConfig
from moe_impl.data.text import TextCorpus

__all__ = [
    "Batch",
    "LM1BCorpus",
    "TextCorpus",
    "TopicMarkov",
    "TopicMarkovConfig",
    "eval_windows",
    "train_windows",
]
