"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from structattn.app.metrics import (
    alignment_error_rate,
    attention_to_links,
    bleu,
    edit_distance,
    perplexity,
    phoneme_error_rate,
    word_error_rate,
)

torch.set_num_threads(1)


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(torch.tensor(0.0), torch.tensor(3)) == 1.0


@pytest.mark.parametrize(
    ("total_nll", "num_tokens", "name"),
    [
        (1.0, 0, "num_tokens"),
        (float("nan"), 3, "total_nll"),
        (-1.0, 3, "total_nll"),
        ("1", 3, "total_nll"),
    ],
)
def test_perplexity_rejects_bad_counts(total_nll, num_tokens, name):
    with pytest.raises(ValueError, match=name):
        perplexity(total_nll, num_tokens)


def test_edit_distance_counts_insertions_deletions_substitutions():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], ["A", "B"]) == 2
    assert edit_distance(["A", "B"], ["A", "B"]) == 0


def test_edit_distance_rejects_plain_strings():
    with pytest.raises(ValueError, match="hypothesis"):
        edit_distance("abc", ["a"])


def test_word_error_rate_counts_items_with_any_error():
    hypotheses = [["K", "AE", "T"], ["D", "AO", "G"]]
    assert word_error_rate(hypotheses, [["K", "AE", "T"], ["D", "AA", "G"]]) == 0.5


def test_word_error_rate_accepts_any_alternative_reference():
    hypotheses = [["R", "IY", "D"]]
    references = [[["R", "EH", "D"], ["R", "IY", "D"]]]
    assert word_error_rate(hypotheses, references) == 0.0


def test_phoneme_error_rate_is_total_edits_over_total_reference_length():
    hypotheses = [["K", "AE", "T"], ["D", "AO", "G"]]
    references = [["K", "AE", "T"], ["D", "AA", "G", "Z"]]  # 1 substitution + 1 deletion
    assert phoneme_error_rate(hypotheses, references) == pytest.approx(2 / 7)


def test_phoneme_error_rate_uses_the_closest_alternative():
    hypotheses = [["R", "IY", "D", "Z"]]
    references = [[["R", "EH", "D"], ["R", "IY", "D"]]]  # 1 edit from the second, 2 from the first
    assert phoneme_error_rate(hypotheses, references) == pytest.approx(1 / 3)


def test_error_rates_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        phoneme_error_rate([["A"]], [["A"], ["B"]])
    with pytest.raises(ValueError, match="hypotheses"):
        word_error_rate("A B", ["A B"])


def test_bleu_matches_hand_computed_ngram_precisions():
    # Precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    score = bleu(
        [["the", "cat", "sat", "on", "the", "mat"]], [["the", "cat", "sat", "on", "a", "mat"]]
    )
    assert score == pytest.approx(expected, abs=1e-6)


def test_bleu_of_identical_strings_is_100():
    assert bleu(["EN el principio crió Dios"], ["EN el principio crió Dios"]) == pytest.approx(100)


def test_bleu_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        bleu(["a"], ["a", "b"])


def test_alignment_error_rate_follows_och_and_ney():
    predicted = {(0, 0), (1, 1), (2, 3)}
    sure = {(0, 0), (1, 2)}
    possible = {(1, 1)}  # sure links count as possible too
    scores = alignment_error_rate(predicted, sure, possible)
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(1 / 2)
    assert scores.aer == pytest.approx(1 - (1 + 2) / (3 + 2))


def test_alignment_error_rate_sums_counts_over_sentences():
    scores = alignment_error_rate([{(0, 0)}, {(0, 1), (1, 1)}], [{(0, 0)}, {(1, 1), (0, 0)}])
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.aer == pytest.approx(1 - 4 / 6)


def test_perfect_alignment_has_zero_error():
    links = {(0, 0), (1, 2)}
    assert alignment_error_rate(links, links) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("predicted", "sure", "name"),
    [
        ({(0, -1)}, {(0, 0)}, "predicted"),
        ({(0, 0)}, {(0, "a")}, "sure"),
        ([{(0, 0)}], [{(0, 0)}, {(1, 1)}], "same number"),
    ],
)
def test_alignment_error_rate_rejects_bad_links(predicted, sure, name):
    with pytest.raises(ValueError, match=name):
        alignment_error_rate(predicted, sure)


def test_attention_to_links_takes_argmax_per_target_position():
    attention = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # (target=2, source=3)
    assert attention_to_links(attention) == {(0, 0), (2, 1)}
    masked = attention_to_links(attention, source_mask=torch.tensor([True, True, False]))
    assert masked == {(0, 0), (0, 1)}


def test_attention_to_links_with_threshold_keeps_every_strong_weight():
    attention = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    assert attention_to_links(attention, threshold=0.5) == {(0, 0), (1, 0), (1, 1)}
    with pytest.raises(ValueError, match="attention"):
        attention_to_links(torch.ones(3))
