"""Evaluation metrics: perplexity, edit-distance error rates, BLEU and alignment error rate.

Every function is corpus-level (sums counts over sentences before dividing) and raises
``ValueError`` naming the offending argument on malformed input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Hashable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "AlignmentScores",
    "alignment_error_rate",
    "attention_to_links",
    "bleu",
    "edit_distance",
    "perplexity",
    "phoneme_error_rate",
    "word_error_rate",
]

Link = tuple[int, int]
# Per item: one symbol sequence, or a list of alternative symbol sequences.
References = Sequence[Sequence[str] | Sequence[Sequence[str]]]


def _check_paired(hypotheses: Sequence, references: Sequence, unit: str) -> None:
    """One reference entry per hypothesis, and at least one ``unit``."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references must have the same length, got {len(hypotheses)} "
            f"and {len(references)}"
        )
    if len(hypotheses) == 0:
        raise ValueError(f"hypotheses must hold at least one {unit}")


def perplexity(total_nll: float | torch.Tensor, num_tokens: int | torch.Tensor) -> float:
    """``exp(total_nll / num_tokens)``: perplexity from a summed negative log-likelihood (nats).

    Args:
        total_nll: the summed NLL over all predicted tokens (a float or 0-dim tensor).
        num_tokens: how many tokens the sum covers (> 0).
    """
    total = _scalar(total_nll, "total_nll")
    count = _scalar(num_tokens, "num_tokens")
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total_nll must be finite and non-negative, got {total}")
    if count <= 0 or count != int(count):
        raise ValueError(f"num_tokens must be a positive integer, got {count}")
    mean = total / count
    return math.exp(mean) if mean < 709.0 else math.inf


def edit_distance(hypothesis: Sequence[Hashable], reference: Sequence[Hashable]) -> int:
    """Levenshtein distance (unit-cost insertions, deletions and substitutions) of two sequences.

    Args:
        hypothesis: ``(n,)`` predicted symbols.
        reference: ``(m,)`` reference symbols.
    """
    _check_sequence(hypothesis, "hypothesis")
    _check_sequence(reference, "reference")
    previous = list(range(len(reference) + 1))
    for i, symbol in enumerate(hypothesis, start=1):
        current = [i]
        for j, target in enumerate(reference, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (symbol != target))
            )
        previous = current
    return previous[-1]


def word_error_rate(
    hypotheses: Sequence[Sequence[str]], references: References
) -> float:
    """Share of items whose prediction matches no reference exactly (G2P word error rate).

    Args:
        hypotheses: one predicted symbol sequence per item (e.g. phones of a word).
        references: per item, either one symbol sequence or a list of alternative sequences
            (e.g. all cmudict pronunciations); a match with any alternative is correct.

    Returns:
        A fraction in ``[0, 1]``.
    """
    alternatives = _pair_up(hypotheses, references)
    errors = sum(
        all(list(hypothesis) != list(option) for option in options)
        for hypothesis, options in zip(hypotheses, alternatives, strict=True)
    )
    return errors / len(hypotheses)


def phoneme_error_rate(
    hypotheses: Sequence[Sequence[str]], references: References
) -> float:
    """Corpus phoneme (symbol) error rate: total edit distance over total reference length.

    With alternative references an item uses the alternative closest to its prediction
    (fewest edits, then shortest), as usual for G2P.

    Args:
        hypotheses: one predicted symbol sequence per item.
        references: per item, one symbol sequence or a list of alternative sequences.

    Returns:
        ``sum(edits) / sum(reference lengths)`` (can exceed 1 for long predictions).
    """
    alternatives = _pair_up(hypotheses, references)
    edits = 0
    length = 0
    for hypothesis, options in zip(hypotheses, alternatives, strict=True):
        distance, size = min((edit_distance(hypothesis, option), len(option)) for option in options)
        edits += distance
        length += size
    if length == 0:
        raise ValueError("references are all empty; the phoneme error rate is undefined")
    return edits / length


def bleu(
    hypotheses: Sequence[str | Sequence[str]],
    references: Sequence[str | Sequence[str]],
    *,
    tokenize: str | None = None,
) -> float:
    """Corpus BLEU (0-100) with sacrebleu, one reference per hypothesis.

    Args:
        hypotheses: detokenized strings, or token sequences (joined with spaces).
        references: same form as ``hypotheses``, one per hypothesis.
        tokenize: sacrebleu tokenizer; default ``"13a"`` for strings and ``"none"`` when
            token sequences are given (they are already tokenized).
    """
    try:
        import sacrebleu
    except ImportError as err:
        raise ImportError(
            "bleu needs the 'sacrebleu' package: pip install sacrebleu "
            "(or pip install 'structattn[data]')"
        ) from err
    _check_paired(hypotheses, references, "sentence")
    pretokenized = not isinstance(hypotheses[0], str)
    hypothesis_lines = [_as_line(item, "hypotheses") for item in hypotheses]
    reference_lines = [_as_line(item, "references") for item in references]
    if tokenize is None:
        tokenize = "none" if pretokenized else "13a"
    # pre-tokenized input ends lines in " ." on purpose: no detokenization warning for it
    result = sacrebleu.corpus_bleu(hypothesis_lines, [reference_lines], tokenize=tokenize,
                                   force=pretokenized)
    return float(result.score)


class AlignmentScores(NamedTuple):
    """Alignment quality against sure/possible reference links (Och & Ney, 2003)."""

    aer: float
    precision: float
    recall: float


def alignment_error_rate(
    predicted: Collection[Link] | Sequence[Collection[Link]],
    sure: Collection[Link] | Sequence[Collection[Link]],
    possible: Collection[Link] | Sequence[Collection[Link]] | None = None,
) -> AlignmentScores:
    """Alignment error rate, precision and recall of predicted links (Och & Ney, 2003).

    With predicted links ``A``, sure links ``S`` and possible links ``P`` (``S`` is added to
    ``P``, so ``S ⊆ P`` always holds), counted over the whole corpus::

        precision = |A ∩ P| / |A|        recall = |A ∩ S| / |S|
        AER       = 1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|)

    Args:
        predicted, sure, possible: links as ``(source_index, target_index)`` pairs, either
            one collection for a single sentence or a sequence with one collection per
            sentence (all three in the same form).  ``possible=None`` means ``P = S``.

    Returns:
        :class:`AlignmentScores` ``(aer, precision, recall)``; precision is 0 when nothing is
        predicted, recall is 0 when there are no sure links.

    Reference: F. J. Och and H. Ney, "A Systematic Comparison of Various Statistical
    Alignment Models", Computational Linguistics 29(1), 2003.
    """
    predicted_sets = _link_sets(predicted, "predicted")
    sure_sets = _link_sets(sure, "sure")
    possible_sets = (
        [set() for _ in sure_sets] if possible is None else _link_sets(possible, "possible")
    )
    if not len(predicted_sets) == len(sure_sets) == len(possible_sets):
        raise ValueError(
            "predicted, sure and possible must cover the same number of sentences, got "
            f"{len(predicted_sets)}, {len(sure_sets)} and {len(possible_sets)}"
        )
    num_predicted = num_sure = hit_sure = hit_possible = 0
    for a, s, p in zip(predicted_sets, sure_sets, possible_sets, strict=True):
        p = p | s
        num_predicted += len(a)
        num_sure += len(s)
        hit_sure += len(a & s)
        hit_possible += len(a & p)
    if num_predicted + num_sure == 0:
        raise ValueError("predicted and sure are both empty; the alignment error rate is undefined")
    precision = hit_possible / num_predicted if num_predicted else 0.0
    recall = hit_sure / num_sure if num_sure else 0.0
    aer = 1.0 - (hit_sure + hit_possible) / (num_predicted + num_sure)
    return AlignmentScores(aer, precision, recall)


def attention_to_links(
    attention: torch.Tensor,
    *,
    threshold: float | None = None,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> set[Link]:
    """Hard links ``(source_index, target_index)`` read off one attention matrix.

    Args:
        attention: ``(target_length, source_length)`` weights of each target position over
            source positions (a decoder's attention for one sentence).
        threshold: link every pair with weight ``>= threshold``; ``None`` links each target
            position to its highest-weight source position (argmax).
        source_mask: ``(source_length,)`` bool, False at positions to ignore (padding, eos).
        target_mask: ``(target_length,)`` bool, False at target positions to ignore.
    """
    if not isinstance(attention, torch.Tensor) or attention.dim() != 2:
        raise ValueError("attention must be a 2-dimensional (target_length, source_length) tensor")
    weights = attention.detach().float().cpu()
    for name, mask, size in (
        ("source_mask", source_mask, weights.shape[1]),
        ("target_mask", target_mask, weights.shape[0]),
    ):
        if mask is not None and (mask.dim() != 1 or mask.shape[0] != size):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(mask.shape)}")
    keep_source = (
        torch.ones(weights.shape[1], dtype=torch.bool) if source_mask is None
        else source_mask.cpu().bool()
    )
    keep_target = (
        torch.ones(weights.shape[0], dtype=torch.bool) if target_mask is None
        else target_mask.cpu().bool()
    )
    if not bool(keep_source.any()):
        return set()
    weights = weights.masked_fill(~keep_source.unsqueeze(0), -math.inf)
    if threshold is None:
        best = weights.argmax(dim=1)
        return {(int(best[t]), t) for t in range(weights.shape[0]) if keep_target[t]}
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
    chosen = (weights >= threshold) & keep_target.unsqueeze(1)
    return {(int(s), int(t)) for t, s in chosen.nonzero().tolist()}


def _scalar(value: float | int | torch.Tensor, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_sequence(value: object, name: str) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name} must be a sequence of symbols (a list or tuple), got {type(value).__name__}"
        )


def _pair_up(
    hypotheses: Sequence[Sequence[str]], references: Sequence[object]
) -> list[list[Sequence[str]]]:
    """Check the inputs and return, per item, its list of alternative references."""
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise ValueError("hypotheses must be a sequence of symbol sequences")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError("references must be a sequence with one entry per hypothesis")
    _check_paired(hypotheses, references, "item")
    alternatives = []
    for index, (hypothesis, reference) in enumerate(zip(hypotheses, references, strict=True)):
        _check_sequence(hypothesis, f"hypotheses[{index}]")
        _check_sequence(reference, f"references[{index}]")
        if len(reference) > 0 and not isinstance(reference[0], str):
            options = list(reference)
            if not options:
                raise ValueError(f"references[{index}] holds no alternative")
            for option in options:
                _check_sequence(option, f"references[{index}]")
        else:
            options = [reference]
        alternatives.append(options)
    return alternatives


def _as_line(item: str | Sequence[str], name: str) -> str:
    if isinstance(item, str):
        return item
    if not isinstance(item, Sequence) or not all(isinstance(token, str) for token in item):
        raise ValueError(f"{name} must hold strings or sequences of string tokens")
    return " ".join(item)


def _link_sets(links: object, name: str) -> list[set[Link]]:
    """One set of ``(int, int)`` links per sentence; a single sentence becomes a list of one."""
    if isinstance(links, (str, bytes)) or not isinstance(links, Collection):
        raise ValueError(f"{name} must be a collection of (source, target) links")
    items = list(links)
    single = len(items) == 0 or _is_link(items[0])
    sentences = [items] if single else items
    out = []
    for index, sentence in enumerate(sentences):
        if isinstance(sentence, (str, bytes)) or not isinstance(sentence, Collection):
            raise ValueError(f"{name}[{index}] must be a collection of (source, target) links")
        converted = set()
        for link in sentence:
            if not _is_link(link):
                raise ValueError(
                    f"{name} holds {link!r}; every link must be a (source_index, target_index) "
                    "pair of non-negative ints"
                )
            converted.add((int(link[0]), int(link[1])))
        out.append(converted)
    return out


def _is_link(value: object) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(
            isinstance(index, numbers.Integral) and not isinstance(index, bool) and index >= 0
            for index in value
        )
    )
