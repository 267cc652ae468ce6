"""Corpora for the language-model experiments. Synthetic (embedded, the default) for now; the LM1B
and WikiText readers follow with the training loop (issue 4)."""

from moe_impl.data.synthetic import Batch, TopicMarkov, TopicMarkovConfig

__all__ = ["Batch", "TopicMarkov", "TopicMarkovConfig"]
