"""Corpus metrics: scores of the whole set of samples, computed once on the main process.

``evaluate`` gathers the samples of every process in order and calls ``task.corpus_metrics(records)``
there; a task's default runs its ``corpus_scorers``, each a ``CorpusMetric``. A metric that needs an
evaluator model (GPT-2 large for generative perplexity, a feature model for MAUVE) loads it in
``load``, which runs once, on first use (``self.model``): never on the other processes, never for
``sample``, and only if the metric is computed at all.

``records`` is a list of dicts, one per sample in index order: ``index``, ``tokens`` (list of ints),
``text`` (``task.decode``) and the per-sample metric values.

Built in: ``metrics.binomial_interval`` (gin), a confidence interval for the rate of a 0/1
per-sample metric, e.g. Sudoku's success.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Dict, List, Tuple

import gin

_NOT_LOADED = object()


def run_scorers(scorers, records: List[dict], who: str, out: Dict[str, Any] = None) -> Dict[str, Any]:
    """Call each corpus scorer on ``records`` and merge their results into ``out`` (a new dict by
    default); two scorers giving the same key is a ValueError naming ``who`` and the keys."""
    out = {} if out is None else out
    for scorer in scorers:
        values = scorer(records)
        clash = sorted(set(values) & set(out))
        if clash:
            raise ValueError(f"{who}: corpus metrics {clash} are computed twice (give the scorers distinct keys)")
        out.update(values)
    return out


class CorpusMetric:
    """``metric(records) -> {name: float}``. Subclasses implement ``__call__`` and, if they need
    an evaluator model, ``load`` (read it through ``self.model``: loaded on first use, then kept)."""

    def load(self) -> Any:
        """Load what the metric needs (a model, a tokenizer, reference texts); called once, lazily."""
        return None

    @property
    def model(self) -> Any:
        if getattr(self, "_model", _NOT_LOADED) is _NOT_LOADED:
            self._model = self.load()
        return self._model

    def __call__(self, records: List[dict]) -> Dict[str, float]:
        raise NotImplementedError


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """The Wilson score interval for a binomial rate: (low, high); (0, 1) when n = 0. Unlike the
    normal approximation p ± z·sqrt(p(1 − p)/n) it stays inside [0, 1] and is not empty at 0 or n
    successes."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@gin.configurable("binomial_interval", module="metrics")
class BinomialInterval(CorpusMetric):
    """``<key>_ci_low``, ``<key>_ci_high``: the Wilson interval (``confidence``, default 95%) of the
    rate of the 0/1 per-sample metric ``key`` over all samples: how far the reported mean could be
    from the rate on unlimited puzzles of the same kind."""

    def __init__(self, key: str = "success", confidence: float = 0.95):
        if not 0 < confidence < 1:
            raise ValueError(f"metrics.binomial_interval.confidence must be in (0, 1), got {confidence}")
        self.key, self.confidence = key, confidence

    def __call__(self, records: List[dict]) -> Dict[str, float]:
        values = [r[self.key] for r in records if self.key in r]
        if len(values) != len(records):
            raise ValueError(f"metrics.binomial_interval: {len(records) - len(values)} of {len(records)} "
                             f"samples have no per-sample metric {self.key!r}")
        if any(v not in (0.0, 1.0) for v in values):
            raise ValueError(f"metrics.binomial_interval: {self.key!r} must be 0 or 1 per sample")
        low, high = wilson_interval(int(sum(values)), len(values), self.confidence)
        return {f"{self.key}_ci_low": low, f"{self.key}_ci_high": high}
