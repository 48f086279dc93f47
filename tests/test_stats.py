"""Statistics of the comparison: metrics from counts, bootstrap intervals, paired tests."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from structattn.app.metrics import (
    alignment_error_rate,
    bleu,
    phoneme_error_rate,
    word_error_rate,
)
from structattn.app.stats import (
    METRICS,
    CorpusMetric,
    alignment_counts,
    bleu_counts,
    bootstrap_interval,
    paired_test,
    register_metric,
    seed_spread,
)
from structattn.app.tasks import G2PTask

PHONES = st.lists(st.sampled_from(["AA", "B", "K", "T"]), min_size=0, max_size=5)
WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=9)


def _binary(rate, size, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.random(size) < rate, np.ones(size)], 1).astype(float)


class _Example:
    def __init__(self, references):
        self.references = references


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(PHONES, st.lists(PHONES.filter(bool), min_size=1, max_size=3)),
                min_size=1, max_size=6))
def test_g2p_counts_give_the_corpus_wer_and_per(items):
    task = G2PTask()
    hypotheses = [h for h, _ in items]
    references = [refs for _, refs in items]
    rows = [task.score(_Example(tuple(map(tuple, refs))), h) for h, refs in items]
    assert METRICS["wer"].value([r["wer"] for r in rows]) == pytest.approx(
        word_error_rate(hypotheses, references))
    assert METRICS["per"].value([r["per"] for r in rows]) == pytest.approx(
        phoneme_error_rate(hypotheses, references))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=8))
def test_bleu_from_counts_matches_sacrebleu(pairs):
    hypotheses = [h for h, _ in pairs]
    references = [r for _, r in pairs]
    counts = [bleu_counts(h, r) for h, r in pairs]
    assert METRICS["bleu"].value(counts) == pytest.approx(bleu(hypotheses, references),
                                                          abs=1e-9)


LINKS = st.sets(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(LINKS, LINKS, LINKS), min_size=1, max_size=5))
def test_alignment_counts_give_aer_precision_and_recall(sentences):
    predicted = [a for a, _, _ in sentences]
    sure = [s for _, s, _ in sentences]
    possible = [p for _, _, p in sentences]
    if not any(predicted) and not any(sure):
        return  # AER is undefined there (alignment_error_rate raises)
    counts = [alignment_counts(a, s, p) for a, s, p in sentences]
    expected = alignment_error_rate(predicted, sure, possible)
    assert METRICS["aer_posterior_map"].value(counts) == pytest.approx(expected.aer)
    assert METRICS["precision_posterior_map"].value(counts) == pytest.approx(expected.precision)
    assert METRICS["recall_posterior_map"].value(counts) == pytest.approx(expected.recall)


def test_perplexity_is_exp_of_the_mean_token_nll():
    counts = np.array([[2.0, 1.0], [4.0, 3.0]])
    assert METRICS["ppl"].value(counts) == pytest.approx(np.exp(6.0 / 4.0))


def test_interval_contains_the_estimate_and_narrows_with_more_examples():
    small = bootstrap_interval("wer", _binary(0.3, 100, 0))
    large = bootstrap_interval("wer", _binary(0.3, 2000, 0))
    for interval in (small, large):
        assert interval.low <= interval.value <= interval.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)


def test_interval_width_matches_the_binomial_standard_error():
    counts = _binary(0.3, 2000, 1)
    interval = bootstrap_interval("wer", counts, resamples=2000)
    rate = interval.value
    half_width = 1.96 * np.sqrt(rate * (1 - rate) / len(counts))
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_interval_covers_the_true_rate_about_95_percent_of_the_time():
    covered = 0
    trials = 60
    for trial in range(trials):
        interval = bootstrap_interval("wer", _binary(0.3, 300, 100 + trial), resamples=400,
                                      seed=trial)
        covered += interval.low <= 0.3 <= interval.high
    assert covered >= 0.85 * trials


def test_a_constant_metric_has_a_degenerate_interval():
    counts = np.tile([1.0, 1.0], (50, 1))
    assert bootstrap_interval("wer", counts) == (1.0, 1.0, 1.0)


def test_identical_modes_differ_by_zero_with_p_value_one():
    counts = _binary(0.4, 200, 2)
    result = paired_test("wer", counts, counts)
    assert result == (0.0, 0.0, 0.0, 1.0)


def test_a_clear_difference_is_significant_and_its_interval_excludes_zero():
    worse = _binary(0.5, 400, 3)
    better = worse.copy()
    better[:100, 0] = 0.0  # the same examples, with a quarter of them fixed
    result = paired_test("wer", worse, better)
    assert result.difference > 0
    assert result.low > 0
    assert result.p_value < 0.01


def test_paired_test_is_antisymmetric():
    a, b = _binary(0.3, 300, 4), _binary(0.35, 300, 5)
    forward, backward = paired_test("per", a, b), paired_test("per", b, a)
    assert forward.difference == pytest.approx(-backward.difference)
    assert forward.low == pytest.approx(-backward.high)


def test_pairing_makes_a_shared_difficulty_cancel():
    # Both modes fail on the same hard examples; one extra error in mode a.  Unpaired
    # intervals overlap almost entirely, the paired interval of the difference is tight.
    rng = np.random.default_rng(6)
    hard = rng.random(500) < 0.5
    a = np.stack([hard, np.ones(500)], 1).astype(float)
    b = a.copy()
    a[np.flatnonzero(~hard)[:5], 0] = 1.0
    result = paired_test("wer", a, b)
    alone = bootstrap_interval("wer", a)
    assert result.high - result.low < 0.25 * (alone.high - alone.low)
    assert result.difference == pytest.approx(0.01)


def test_permutation_p_value_matches_exact_sign_flip_enumeration():
    a = np.array([[1, 1], [1, 1], [0, 1], [1, 1], [1, 1], [0, 1], [1, 1], [0, 1]], float)
    b = np.array([[0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]], float)
    observed = abs(a[:, 0].mean() - b[:, 0].mean())
    extreme = 0
    total = 0
    for flips in itertools.product([False, True], repeat=len(a)):
        swap = np.array(flips)
        x = np.where(swap, b[:, 0], a[:, 0])
        y = np.where(swap, a[:, 0], b[:, 0])
        extreme += abs(x.mean() - y.mean()) >= observed - 1e-12
        total += 1
    # 2^8 = 256 relabellings <= resamples: scipy enumerates them all (an exact test)
    assert paired_test("wer", a, b, resamples=1000).p_value == pytest.approx(extreme / total)


def test_seed_spread_is_mean_and_sample_standard_deviation():
    spread = seed_spread([0.2, 0.4, 0.3])
    assert spread.mean == pytest.approx(0.3)
    assert spread.std == pytest.approx(np.std([0.2, 0.4, 0.3], ddof=1))
    assert seed_spread([0.5]).std == 0.0


def test_a_user_metric_registers_and_resamples():
    metric = register_metric(CorpusMetric("accuracy_test", ("right", "items"),
                                          lambda s: s[..., 0] / s[..., 1], True))
    counts = np.stack([np.arange(40) % 2, np.ones(40)], 1).astype(float)
    interval = bootstrap_interval("accuracy_test", counts)
    assert interval.value == 0.5 and interval.low < 0.5 < interval.high
    assert metric.better(0.6, 0.5) and not METRICS["wer"].better(0.6, 0.5)
    del METRICS["accuracy_test"]


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_interval("wer", np.ones((5, 3))), "counts"),
    (lambda: bootstrap_interval("wer", np.ones((0, 2))), "counts"),
    (lambda: bootstrap_interval("nonsense", np.ones((5, 2))), "metric"),
    (lambda: bootstrap_interval("wer", np.ones((5, 2)), confidence=1.5), "confidence"),
    (lambda: bootstrap_interval("wer", np.ones((5, 2)), resamples=10), "resamples"),
    (lambda: paired_test("wer", np.ones((5, 2)), np.ones((6, 2))), "counts_a"),
    (lambda: seed_spread([]), "values"),
    (lambda: register_metric("wer"), "metric"),
    (lambda: bootstrap_interval("wer", [[np.nan, 1.0]]), "finite"),
])
def test_bad_input_raises_a_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()
