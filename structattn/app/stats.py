"""Statistics for comparing modes on one test set: bootstrap intervals and paired tests.

Every corpus metric used by the application (WER, PER, perplexity, BLEU, AER, precision,
recall) is a function of **summed per-example counts** (errors and items, edits and reference
lengths, n-gram matches and totals, link counts).  A :class:`CorpusMetric` names those count
columns and the function of their sums, so one resampling scheme serves every metric:

- :func:`bootstrap_interval`: a percentile bootstrap over test examples
  (``scipy.stats.bootstrap``).  Resamples are drawn from a seeded generator that depends only on
  the number of examples, so every mode evaluated on the same test set is resampled with the
  **same** example indices (the intervals are paired between modes).
- :func:`paired_test`: the difference between two modes on the same examples, its paired
  bootstrap interval, and a two-sided paired permutation test (approximate randomisation:
  ``scipy.stats.permutation_test`` with ``permutation_type="samples"`` swaps the two modes'
  counts example by example).
- :func:`seed_spread`: mean and sample standard deviation of a metric across training seeds.

scipy is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "ALIGNMENT_READINGS",
    "METRICS",
    "CorpusMetric",
    "Interval",
    "PairedResult",
    "SeedSpread",
    "alignment_counts",
    "alignment_metrics",
    "metric_label",
    "bleu_counts",
    "bootstrap_interval",
    "paired_test",
    "register_metric",
    "seed_spread",
]

# Keeps a vectorised resample block (resamples x examples x columns floats) near 50 MB.
_BLOCK_ELEMENTS = 6_000_000


@dataclass(frozen=True)
class CorpusMetric:
    """A corpus-level metric computed from summed per-example counts.

    Attributes:
        name: the key in results (``"wer"``, ``"aer_posterior_map"``, ...).
        columns: names of the per-example count columns, in order.
        from_sums: ``(..., len(columns))`` summed counts -> ``(...)`` metric values; it must
            broadcast over leading dimensions (resamples).
        higher_is_better: the direction used to name the best mode.
        label: a short human-readable description for tables and figures.
    """

    name: str
    columns: tuple[str, ...]
    from_sums: Callable[[np.ndarray], np.ndarray]
    higher_is_better: bool = False
    label: str = ""

    def value(self, counts: np.ndarray) -> float:
        """The metric of the whole corpus from per-example ``counts`` ``(examples, columns)``."""
        counts = self.check(counts)
        return float(self.from_sums(counts.sum(0)))

    def check(self, counts: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """``counts`` as a float array ``(examples, columns)``; ValueError if malformed."""
        array = np.asarray(counts, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != len(self.columns) or array.shape[0] == 0:
            raise ValueError(
                f"counts for metric {self.name!r} must have shape (examples >= 1, "
                f"{len(self.columns)}) with columns {self.columns}, got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"counts for metric {self.name!r} must be finite")
        return array

    def better(self, a: float, b: float) -> bool:
        """Whether value ``a`` is strictly better than ``b`` under this metric's direction."""
        return a > b if self.higher_is_better else a < b


#: metric name -> :class:`CorpusMetric`; extend with :func:`register_metric`
METRICS: dict[str, CorpusMetric] = {}


def register_metric(metric: CorpusMetric) -> CorpusMetric:
    """Add ``metric`` to :data:`METRICS` (replacing one of the same name) and return it."""
    if not isinstance(metric, CorpusMetric):
        raise ValueError(f"metric must be a CorpusMetric, got {type(metric).__name__}")
    METRICS[metric.name] = metric
    return metric


def _ratio(sums: np.ndarray, numerator: int, denominator: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., denominator] > 0,
                        sums[..., numerator] / np.maximum(sums[..., denominator], 1e-300), 0.0)


def _perplexity(sums: np.ndarray) -> np.ndarray:
    mean = sums[..., 0] / np.maximum(sums[..., 1], 1e-300)
    return np.exp(np.minimum(mean, 709.0))


def _bleu(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) as sacrebleu computes it (4-grams, 'exp' smoothing)."""
    matches, totals = sums[..., 0:4], sums[..., 4:8]
    hyp_len, ref_len = sums[..., 8], sums[..., 9]
    log_precision = np.zeros(sums.shape[:-1])
    smooth = np.ones(sums.shape[:-1])
    for n in range(4):
        zero = matches[..., n] == 0
        smooth = np.where(zero, smooth * 2.0, smooth)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(zero, 100.0 / (smooth * np.maximum(totals[..., n], 1e-300)),
                         100.0 * matches[..., n] / np.maximum(totals[..., n], 1e-300))
        log_precision = log_precision + np.log(np.maximum(p, 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(hyp_len < ref_len,
                           np.exp(1.0 - ref_len / np.maximum(hyp_len, 1e-300)), 1.0)
    score = brevity * np.exp(log_precision / 4.0)
    # sacrebleu scores 0 when no n-gram matches at all, and when some order has no candidate
    any_match = (matches > 0).any(-1)
    return np.where((hyp_len > 0) & (totals > 0).all(-1) & any_match, score, 0.0)


_BLEU_COLUMNS = tuple(f"match{n}" for n in range(1, 5)) + tuple(
    f"total{n}" for n in range(1, 5)) + ("hyp_len", "ref_len")
_ALIGN_COLUMNS = ("predicted", "sure", "hit_sure", "hit_possible")


def _aer(sums: np.ndarray) -> np.ndarray:
    predicted, sure, hit_sure, hit_possible = (sums[..., i] for i in range(4))
    return 1.0 - (hit_sure + hit_possible) / np.maximum(predicted + sure, 1e-300)


for _metric in (
    CorpusMetric("wer", ("errors", "items"), lambda s: _ratio(s, 0, 1), False,
                 "word error rate"),
    CorpusMetric("per", ("edits", "reference_length"), lambda s: _ratio(s, 0, 1), False,
                 "phoneme error rate"),
    CorpusMetric("ppl", ("nll", "tokens"), _perplexity, False, "perplexity"),
    CorpusMetric("bleu", _BLEU_COLUMNS, _bleu, True, "BLEU"),
):
    register_metric(_metric)

#: the readings of a model's alignment scored against reference links
ALIGNMENT_READINGS = ("prior_argmax", "posterior_map", "posterior_marginals")


def alignment_metrics(reading: str) -> list[CorpusMetric]:
    """AER, precision and recall of one alignment reading (same four count columns)."""
    return [
        CorpusMetric(f"aer_{reading}", _ALIGN_COLUMNS, _aer, False, f"AER, {reading}"),
        CorpusMetric(f"precision_{reading}", _ALIGN_COLUMNS, lambda s: _ratio(s, 3, 0), True,
                     f"precision, {reading}"),
        CorpusMetric(f"recall_{reading}", _ALIGN_COLUMNS, lambda s: _ratio(s, 2, 1), True,
                     f"recall, {reading}"),
    ]


for _reading in ALIGNMENT_READINGS:
    for _metric in alignment_metrics(_reading):
        register_metric(_metric)


def bleu_counts(hypothesis: Sequence[str], reference: Sequence[str]) -> list[float]:
    """Per-sentence BLEU counts (columns of the ``bleu`` metric) of pre-tokenised sequences."""
    row = [0.0] * 10
    for n in range(1, 5):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        row[n - 1] = float(sum((hyp & ref).values()))
        row[n + 3] = float(max(len(hypothesis) - n + 1, 0))
    row[8], row[9] = float(len(hypothesis)), float(len(reference))
    return row


def alignment_counts(predicted: set, sure: set, possible: set) -> list[float]:
    """Per-sentence AER counts ``(|A|, |S|, |A ∩ S|, |A ∩ P|)`` with ``S`` added to ``P``."""
    possible = set(possible) | set(sure)
    return [float(len(predicted)), float(len(sure)), float(len(predicted & set(sure))),
            float(len(predicted & possible))]


class Interval(NamedTuple):
    """A point estimate with a confidence interval."""

    value: float
    low: float
    high: float


class PairedResult(NamedTuple):
    """``a - b`` on the same examples: the difference, its interval and a paired p-value."""

    difference: float
    low: float
    high: float
    p_value: float


class SeedSpread(NamedTuple):
    """A metric across training seeds: mean, sample standard deviation and the values."""

    mean: float
    std: float
    values: tuple[float, ...]


def _resample_statistic(metric: CorpusMetric, tables: Sequence[np.ndarray]):
    """``indices (..., n) -> metric of tables[0] - metric of tables[1]`` (or of one table)."""

    def statistic(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        indices = np.moveaxis(np.asarray(indices), axis, -1).astype(np.int64)
        values = [metric.from_sums(table[indices].sum(-2)) for table in tables]
        return values[0] if len(values) == 1 else values[0] - values[1]

    return statistic


def _batch(examples: int, columns: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, examples * columns))


def bootstrap_interval(
    metric: CorpusMetric | str,
    counts: np.ndarray | Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> Interval:
    """The corpus metric with a percentile bootstrap interval over examples.

    Two calls with the same ``seed`` and number of examples resample the same example indices,
    so intervals of different modes on one test set are paired.

    Args:
        metric: a :class:`CorpusMetric` or a name in :data:`METRICS`.
        counts: ``(examples, columns)`` per-example counts.
        confidence: the interval's coverage, in ``(0, 1)``.
        resamples: bootstrap resamples (>= 100).
        seed: seeds the resampling.
    """
    from scipy import stats

    metric = _metric(metric)
    table = metric.check(counts)
    _check_settings(confidence, resamples)
    value = float(metric.from_sums(table.sum(0)))
    if table.shape[0] == 1:
        return Interval(value, value, value)
    result = stats.bootstrap(
        (np.arange(table.shape[0]),), _resample_statistic(metric, [table]), vectorized=True,
        n_resamples=resamples, batch=_batch(*table.shape), confidence_level=confidence,
        method="percentile", random_state=np.random.default_rng(seed),
    )
    return Interval(value, float(result.confidence_interval.low),
                    float(result.confidence_interval.high))


def paired_test(
    metric: CorpusMetric | str,
    counts_a: np.ndarray | Sequence[Sequence[float]],
    counts_b: np.ndarray | Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedResult:
    """Compare modes ``a`` and ``b`` scored on the same examples (row ``i`` = example ``i``).

    Returns ``metric(a) - metric(b)``, a paired percentile-bootstrap interval of that
    difference, and the two-sided p-value of a paired permutation test (each example's counts
    are swapped between the modes at random; ``scipy.stats.permutation_test``).
    """
    from scipy import stats

    metric = _metric(metric)
    table_a, table_b = metric.check(counts_a), metric.check(counts_b)
    if table_a.shape != table_b.shape:
        raise ValueError(
            f"counts_a and counts_b must cover the same examples, got {table_a.shape} and "
            f"{table_b.shape}"
        )
    _check_settings(confidence, resamples)
    difference = float(metric.from_sums(table_a.sum(0)) - metric.from_sums(table_b.sum(0)))
    examples = table_a.shape[0]
    if examples == 1 or np.array_equal(table_a, table_b):
        return PairedResult(difference, difference, difference, 1.0)
    batch = _batch(examples, table_a.shape[1])
    interval = stats.bootstrap(
        (np.arange(examples),), _resample_statistic(metric, [table_a, table_b]),
        vectorized=True, n_resamples=resamples, batch=batch, confidence_level=confidence,
        method="percentile", random_state=np.random.default_rng(seed),
    ).confidence_interval
    # Rows 0..n-1 are a's examples, n..2n-1 b's; swapping x_i and y_i swaps the two modes.
    stacked = np.concatenate([table_a, table_b])

    def swapped(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        x = np.moveaxis(np.asarray(x), axis, -1).astype(np.int64)
        y = np.moveaxis(np.asarray(y), axis, -1).astype(np.int64)
        return (metric.from_sums(stacked[x].sum(-2)) - metric.from_sums(stacked[y].sum(-2)))

    test = stats.permutation_test(
        (np.arange(examples), np.arange(examples, 2 * examples)), swapped,
        permutation_type="samples", vectorized=True, n_resamples=resamples, batch=batch,
        alternative="two-sided", random_state=np.random.default_rng(seed + 1),
    )
    return PairedResult(difference, float(interval.low), float(interval.high),
                        float(test.pvalue))


def seed_spread(values: Sequence[float]) -> SeedSpread:
    """Mean and sample standard deviation (``ddof=1``; 0 for one seed) across seeds."""
    numbers = [float(v) for v in values]
    if not numbers:
        raise ValueError("values must hold at least one seed's metric")
    mean = math.fsum(numbers) / len(numbers)
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
    return SeedSpread(mean, std, tuple(numbers))


def _metric(metric: CorpusMetric | str) -> CorpusMetric:
    if isinstance(metric, CorpusMetric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"metric must be a CorpusMetric or one of {sorted(METRICS)}, "
                         f"got {metric!r}")
    return METRICS[metric]


def _check_settings(confidence: float, resamples: int) -> None:
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")


def metric_label(name: str) -> str:
    """A human-readable label of a metric name."""
    metric: CorpusMetric | None = METRICS.get(name)
    return metric.label if metric is not None and metric.label else name
