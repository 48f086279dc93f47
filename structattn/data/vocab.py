"""Symbol vocabularies: symbols <-> integer ids, with padding, sentence markers and unknowns.

A :class:`Vocab` is built once from training data and saved inside checkpoints as a plain
``dict`` (:meth:`Vocab.to_dict` / :meth:`Vocab.from_dict`), so a model can be reloaded without
the corpus.  Ids ``0 .. len(specials) - 1`` are the special symbols, in the order
pad, bos, eos, unk (unk only when the vocabulary has one).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Vocab"]

_FORMAT = "structattn.vocab"


class Vocab:
    """A bijection between symbols (strings) and ids ``0 .. len(self) - 1``.

    Args:
        symbols: the ordinary symbols, in id order after the specials; duplicates and symbols
            equal to a special are rejected.
        pad: padding symbol (id 0).
        bos: begin-of-sequence symbol (id 1).
        eos: end-of-sequence symbol (id 2).
        unk: unknown-symbol marker (id 3), or ``None`` for a closed vocabulary in which
            :meth:`encode` raises on any symbol it does not know.

    Example::

        vocab = Vocab.build([["h", "i"], ["h", "o"]])
        vocab.encode(["h", "i"], add_bos=True, add_eos=True)   # [1, 4, 5, 2]
    """

    def __init__(
        self,
        symbols: Iterable[str],
        *,
        pad: str = "<pad>",
        bos: str = "<s>",
        eos: str = "</s>",
        unk: str | None = "<unk>",
    ) -> None:
        specials = [pad, bos, eos] + ([] if unk is None else [unk])
        for name, value in zip(("pad", "bos", "eos", "unk"), specials, strict=False):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special symbols must be distinct, got {specials}")
        if isinstance(symbols, str):
            raise ValueError("symbols must be an iterable of strings, not a single string")
        self._id_to_symbol: list[str] = list(specials)
        self._symbol_to_id: dict[str, int] = {s: i for i, s in enumerate(specials)}
        for symbol in symbols:
            if not isinstance(symbol, str):
                raise ValueError(f"symbols must be strings, got {type(symbol).__name__}")
            if symbol in self._symbol_to_id:
                raise ValueError(f"symbols contains {symbol!r} twice (or it is a special symbol)")
            self._symbol_to_id[symbol] = len(self._id_to_symbol)
            self._id_to_symbol.append(symbol)
        self.pad, self.bos, self.eos, self.unk = pad, bos, eos, unk
        self.num_specials = len(specials)

    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[str]],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        **specials: Any,
    ) -> Vocab:
        """Build a vocabulary from symbol sequences, most frequent first (ties by symbol).

        Args:
            sequences: training sequences of symbols.
            min_count: drop symbols seen fewer times than this.
            max_size: keep at most this many ordinary symbols (specials not counted).
            **specials: ``pad``, ``bos``, ``eos``, ``unk`` as in the constructor.
        """
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive int, got {min_count!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
            raise ValueError(f"max_size must be a non-negative int or None, got {max_size!r}")
        counts: Counter[str] = Counter()
        for sequence in sequences:
            if isinstance(sequence, str):
                raise ValueError("sequences must hold sequences of symbols, not strings")
            counts.update(sequence)
        # (checked once per distinct symbol, not per token)
        strange = [symbol for symbol in counts if not isinstance(symbol, str)]
        if strange:
            raise ValueError(f"symbols must be strings, got {strange[0]!r} "
                             f"({type(strange[0]).__name__})")
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        kept = [symbol for symbol, count in ranked if count >= min_count]
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept, **specials)

    def __len__(self) -> int:
        return len(self._id_to_symbol)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._symbol_to_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk={self.unk!r})"

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown marker, ``None`` for a closed vocabulary."""
        return None if self.unk is None else 3

    @property
    def symbols(self) -> list[str]:
        """All symbols in id order, specials first."""
        return list(self._id_to_symbol)

    def index(self, symbol: str) -> int:
        """Id of ``symbol``; unknown symbols map to unk, or raise ``ValueError`` without one."""
        found = self._symbol_to_id.get(symbol)
        if found is not None:
            return found
        if self.unk is None:
            raise ValueError(
                f"symbol {symbol!r} is not in the vocabulary and the vocabulary has no unk "
                "symbol; build it with unk='<unk>' to map unknown symbols"
            )
        return 3

    def encode(
        self, symbols: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Map a symbol sequence to ids, optionally framed by bos/eos."""
        if isinstance(symbols, str):
            raise ValueError("symbols must be a sequence of symbols, not a string")
        ids = [self.index(symbol) for symbol in symbols]
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> list[str]:
        """Map ids back to symbols.

        With ``strip_special`` (default) decoding stops at the first eos and drops pad and bos,
        which is what a generated ``(length,)`` row needs.
        """
        out: list[str] = []
        for position, raw in enumerate(ids):
            index = _integer_id(raw, position)
            if not 0 <= index < len(self._id_to_symbol):
                raise ValueError(f"ids contains {index}, outside 0..{len(self) - 1}")
            if strip_special:
                if index == self.eos_id:
                    break
                if index in (self.pad_id, self.bos_id):
                    continue
            out.append(self._id_to_symbol[index])
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (strings and lists only) that ``torch.load(weights_only=True)`` accepts."""
        return {
            "format": _FORMAT,
            "specials": {"pad": self.pad, "bos": self.bos, "eos": self.eos, "unk": self.unk},
            "symbols": self._id_to_symbol[self.num_specials :],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError("state is not a structattn vocabulary (missing format marker)")
        specials = state.get("specials")
        symbols = state.get("symbols")
        if not isinstance(specials, Mapping) or not isinstance(symbols, list):
            raise ValueError("state must hold a 'specials' mapping and a 'symbols' list")
        return cls(symbols, **dict(specials))


def _integer_id(raw: object, position: int) -> int:
    """``raw`` as an int: Python, NumPy or 0-dimensional integer tensor ids, never a float
    (``3.7`` would otherwise silently become 3) nor a bool."""
    if isinstance(raw, bool):
        raise ValueError(f"ids[{position}] is the bool {raw!r}; ids must be integers")
    try:
        return operator.index(raw)
    except TypeError:
        raise ValueError(
            f"ids[{position}] is {raw!r} ({type(raw).__name__}); ids must be integers"
        ) from None
