"""English -> Spanish Bible verse pairs with reference word links from Strong's numbers.

Source: the Debian packages ``sword-text-kjv`` (King James Version, 1769 text, module
``engKJV2006eb``) and ``sword-text-sparv`` (Reina-Valera 1909, module ``spaRV1909eb``), both
public domain, both declaring KJV versification and both tagging words or phrases with Strong's
numbers (``<w lemma="strong:H0430">God</w>`` / ``<w lemma="strong:H0430">Dios</w>``).
Install them with::

    sudo apt-get install sword-text-kjv sword-text-sparv

They are read here directly from the SWORD zText files with :func:`read_ztext` (no libsword).

Choices:

* **Text**: OSIS markup is removed; footnotes and editorial headings are dropped, canonical
  Psalm titles are kept (both translations include them in verse 1), the KJV pilcrow ``¶``
  is dropped.  Tokens are words (``\\w+`` with inner apostrophes) and single punctuation marks;
  case is kept unless ``lowercase=True``.
* **Pairs**: a verse is kept when both translations have at least one token; each pair
  carries its book (OSIS id such as ``"Gen"``), chapter and verse (KJV versification).
* **Links**: a word token inherits the Strong's numbers of the ``<w>`` span around it
  (punctuation never does; numbers are normalised to ``H430``/``G2316``).  An English token
  and a Spanish token are a **possible** link when they share a number.  They are a **sure**
  link when, in addition, that number tags exactly one span on each side of the verse, so the
  span-to-span correspondence is unambiguous.  Sure is a subset of possible.  Spans are
  often phrases (``EN el principio`` <-> ``beginning``), so links are phrase-level; treat
  them as silver references for alignment error rate.
* **Misnumbered verses**: although both modules declare KJV versification, the Spanish one
  keeps Hebrew verse numbers in a few chapters (Numbers 13, 1 Samuel 24, Jonah 2, parts of
  Job, ...), so those slots hold different verses.  :func:`load_bible` drops pairs whose
  Strong's-number sets overlap (Jaccard) below ``min_strongs_overlap`` (default 0.3; 236 pairs,
  including pairs with no numbers at all) from every split.
* **Split by book**: dev = Ruth, Esther, Mark, Philippians; test = Daniel, Jonah, John,
  James (each mixes Hebrew- and Greek-numbered books); every other book is train.
  Sizes with sword-text-kjv 14.3 and sword-text-sparv 2.60: train 28,433, dev 1,033,
  test 1,382 (30,848 of 31,084 pairs; all 31,084 with ``min_strongs_overlap=0``).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from structattn.data.splits import Splits

__all__ = [
    "DEV_BOOKS",
    "TEST_BOOKS",
    "INSTALL_HINT",
    "ParsedVerse",
    "SwordModuleNotFoundError",
    "VersePair",
    "load_bible",
    "load_verse_pairs",
    "parse_osis_verse",
    "read_ztext",
    "sword_module_path",
]

ENGLISH_MODULE = "engKJV2006eb"
SPANISH_MODULE = "spaRV1909eb"
DEV_BOOKS = ("Ruth", "Esth", "Mark", "Phil")
TEST_BOOKS = ("Dan", "Jonah", "John", "Jas")
INSTALL_HINT = "sudo apt-get install sword-text-kjv sword-text-sparv"
SWORD_PATH_ENV = "STRUCTATTN_SWORD_PATH"
_DEFAULT_ROOTS = ("/usr/share/sword", "/usr/local/share/sword", "~/.sword")

# KJV versification: (books, chapters, verses) per testament, used to check the module layout.
_KJV_SHAPE = {"ot": (39, 929, 23145), "nt": (27, 260, 7957)}

_TAG_OR_TEXT = re.compile(r"<[^>]*>|[^<]+")
_TAG_NAME = re.compile(r"<\s*(/?)\s*([A-Za-z][\w:.-]*)")
_ATTRIBUTE = re.compile(r'([\w:.-]+)\s*=\s*"([^"]*)"')
_ATTRIBUTE_LEMMA = re.compile(r'\blemma\s*=\s*"([^"]*)"')
_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_STRONGS = re.compile(r"(?:strong:)?([HG])0*(\d+)([a-z]?)$")
_CHAPTER_START = re.compile(r'<chapter\b[^>]*\bsID="[^"]*"[^>]*>')


class SwordModuleNotFoundError(FileNotFoundError):
    """A SWORD Bible module is not installed where structattn looked for it."""


@dataclass(frozen=True)
class VersePair:
    """One verse in English (source) and Spanish (target) with reference links.

    Attributes:
        book, chapter, verse: the KJV reference, book as an OSIS id (``"Gen"``, ``"Matt"``).
        source: ``(source_length,)`` English tokens.
        target: ``(target_length,)`` Spanish tokens.
        source_strongs, target_strongs: per token, the Strong's numbers it carries
            (empty tuple for untagged words and punctuation).
        sure, possible: reference links as ``(source_index, target_index)`` pairs;
            ``sure`` is a subset of ``possible``.
        source_text, target_text: the verse as plain text.
    """

    book: str
    chapter: int
    verse: int
    source: tuple[str, ...]
    target: tuple[str, ...]
    source_strongs: tuple[tuple[str, ...], ...]
    target_strongs: tuple[tuple[str, ...], ...]
    sure: frozenset[tuple[int, int]]
    possible: frozenset[tuple[int, int]]
    source_text: str
    target_text: str

    @property
    def strongs_overlap(self) -> float:
        """Jaccard overlap of the two sides' Strong's-number sets (0 when neither has any).

        Low values flag verses that the two modules number differently.
        """
        english = {number for numbers in self.source_strongs for number in numbers}
        spanish = {number for numbers in self.target_strongs for number in numbers}
        union = english | spanish
        return len(english & spanish) / len(union) if union else 0.0

    @property
    def reference(self) -> str:
        """``"Gen 1:1"``."""
        return f"{self.book} {self.chapter}:{self.verse}"


@dataclass(frozen=True)
class ParsedVerse:
    """One OSIS verse entry: tokens, their Strong's numbers, their ``<w>`` span ids, plain text."""

    tokens: tuple[str, ...]
    strongs: tuple[tuple[str, ...], ...]
    spans: tuple[int | None, ...]
    text: str


def sword_module_path(module: str, module_root: str | os.PathLike | None = None) -> Path:
    """Directory holding ``module``'s zText files (``ot.bzs`` ... ``nt.bzz``).

    Args:
        module: SWORD module name, e.g. ``"engKJV2006eb"``.
        module_root: a SWORD library root (the directory holding ``mods.d/`` and
            ``modules/``).  Without it, ``$STRUCTATTN_SWORD_PATH``, then ``$SWORD_PATH``,
            then ``/usr/share/sword``, ``/usr/local/share/sword`` and ``~/.sword`` are tried.

    Raises:
        SwordModuleNotFoundError: with the ``apt-get`` line that installs the Bibles.
    """
    if module_root is not None:
        roots = [str(module_root)]
    else:
        roots = [
            value for value in (os.environ.get(SWORD_PATH_ENV), os.environ.get("SWORD_PATH"))
            if value
        ]
        roots += list(_DEFAULT_ROOTS)
    searched = []
    for root in roots:
        candidate = Path(root).expanduser() / "modules" / "texts" / "ztext" / module
        searched.append(str(candidate))
        if all((candidate / f"{part}.{ext}").is_file() for part in ("ot", "nt")
               for ext in ("bzs", "bzv", "bzz")):
            return candidate
    raise SwordModuleNotFoundError(
        f"SWORD Bible module {module!r} was not found (looked in: {', '.join(searched)}). "
        f"Install the Bibles with:\n    {INSTALL_HINT}\n"
        f"or point module_root (or ${SWORD_PATH_ENV}) at a SWORD directory that holds "
        f"modules/texts/ztext/{module}/."
    )


def read_ztext(module_path: str | os.PathLike, testament: str) -> list[str]:
    """Every index entry of one testament of a SWORD zText module, as raw OSIS strings.

    The format: ``<t>.bzs`` holds 12-byte block records (offset, compressed size,
    uncompressed size; little-endian uint32), ``<t>.bzz`` the zlib-compressed blocks, and
    ``<t>.bzv`` 10-byte verse records (block number and offset: uint32, length: uint16)
    pointing into the decompressed blocks.  Entry 0 is the module heading, entry 1 the
    testament heading, then book, chapter and verse entries in versification order.

    Args:
        module_path: the module's data directory (see :func:`sword_module_path`).
        testament: ``"ot"`` or ``"nt"``.

    Returns:
        One string per index entry (empty for empty entries).
    """
    if testament not in ("ot", "nt"):
        raise ValueError(f"testament must be 'ot' or 'nt', got {testament!r}")
    base = Path(module_path)
    try:
        block_index = (base / f"{testament}.bzs").read_bytes()
        verse_index = (base / f"{testament}.bzv").read_bytes()
        compressed = (base / f"{testament}.bzz").read_bytes()
    except FileNotFoundError as err:
        raise SwordModuleNotFoundError(
            f"{err.filename} is missing; install the Bibles with: {INSTALL_HINT}"
        ) from err
    if len(block_index) % 12 or len(verse_index) % 10:
        raise ValueError(f"{base}: {testament}.bzs/.bzv sizes are not whole records; corrupt?")
    blocks: dict[int, bytes] = {}

    def block(number: int) -> bytes:
        if number not in blocks:
            if not 0 <= number < len(block_index) // 12:
                raise ValueError(f"{base}/{testament}.bzv points to missing block {number}")
            offset, size, _ = struct.unpack_from("<III", block_index, 12 * number)
            try:
                blocks[number] = zlib.decompress(compressed[offset : offset + size])
            except zlib.error as err:
                raise ValueError(f"{base}/{testament}.bzz block {number} is corrupt") from err
        return blocks[number]

    raw = [
        block(number)[start : start + length] if length else b""
        for number, start, length in struct.iter_unpack("<IIH", verse_index)
    ]
    entries = []
    for index, data in enumerate(raw):
        try:
            entries.append(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            # Name the verse: chapter markers before it survive a lenient decode of the rest.
            lenient = [entry.decode("utf-8", errors="replace") for entry in raw[: index + 1]]
            raise ValueError(
                f"SWORD module {base.name} ({base}), {testament.upper()} entry {index} "
                f"({_entry_label(lenient, index)}): invalid UTF-8 at byte {err.start} "
                f"({err.reason}); the module file is damaged, reinstall it"
            ) from err
    return entries


def _entry_label(entries: Sequence[str], index: int) -> str:
    """A reference such as ``Gen 1:3`` for entry ``index``, from the last chapter marker
    before it (or ``a heading`` when there is none)."""
    for position in range(index, -1, -1):
        match = _CHAPTER_START.search(entries[position])
        if match:
            osis_id = dict(_ATTRIBUTE.findall(match.group(0))).get("osisID", "?")
            book, _, chapter = osis_id.rpartition(".")
            if position == index:
                return f"the heading of {book} {chapter}"
            return f"{book} {chapter}:{index - position}"
    return "a heading before the first chapter"


def parse_osis_verse(osis: str, *, lowercase: bool = False) -> ParsedVerse:
    """Tokens, per-token Strong's numbers and ``<w>`` span ids of one OSIS verse entry."""
    tokens: list[str] = []
    strongs: list[tuple[str, ...]] = []
    spans: list[int | None] = []
    pieces: list[str] = []
    skip_depth = 0
    span_numbers: tuple[str, ...] = ()
    span_id: int | None = None
    next_span = 0
    for piece in _TAG_OR_TEXT.findall(osis):
        if piece[0] == "<":
            closing = piece[1:2] == "/"
            self_closing = piece.endswith("/>")
            if skip_depth:
                if not self_closing:
                    skip_depth += -1 if closing else 1
                continue
            if self_closing:
                continue
            match = _TAG_NAME.match(piece)
            name = match.group(2) if match else ""
            if name == "w":
                if closing:
                    span_numbers, span_id = (), None
                else:
                    lemma = _ATTRIBUTE_LEMMA.search(piece)
                    span_numbers = _strongs_numbers(lemma.group(1) if lemma else "")
                    span_id, next_span = next_span, next_span + 1
            elif not closing and (
                name == "note" or (name == "title" and 'canonical="true"' not in piece)
            ):
                skip_depth = 1
            continue
        if skip_depth:
            continue
        text = html.unescape(piece).replace("¶", " ") if ("&" in piece or "¶" in piece) else piece
        pieces.append(text)
        for token in _TOKEN.findall(text):
            # _TOKEN yields words (starting with a word character) or one punctuation mark.
            is_word = token[0].isalnum() or token[0] == "_"
            tokens.append(token.lower() if lowercase else token)
            strongs.append(span_numbers if is_word else ())
            spans.append(span_id if is_word and span_numbers else None)
    plain = " ".join("".join(pieces).split())
    return ParsedVerse(tuple(tokens), tuple(strongs), tuple(spans), plain)


@functools.lru_cache(maxsize=65536)
def _strongs_numbers(lemma: str) -> tuple[str, ...]:
    numbers = []
    for item in lemma.split():
        match = _STRONGS.match(item)
        if match:
            numbers.append(f"{match.group(1)}{int(match.group(2))}{match.group(3)}")
    return tuple(dict.fromkeys(numbers))


def _links(
    english: ParsedVerse, spanish: ParsedVerse
) -> tuple[frozenset[tuple[int, int]], frozenset[tuple[int, int]]]:
    """(sure, possible) token links from shared Strong's numbers (see the module docstring)."""

    def by_number(verse: ParsedVerse) -> dict[str, dict[int, list[int]]]:
        table: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (numbers, span) in enumerate(zip(verse.strongs, verse.spans, strict=True)):
            for number in numbers:
                table[number][span].append(index)
        return table

    english_table, spanish_table = by_number(english), by_number(spanish)
    sure: set[tuple[int, int]] = set()
    possible: set[tuple[int, int]] = set()
    for number, english_spans in english_table.items():
        spanish_spans = spanish_table.get(number)
        if not spanish_spans:
            continue
        pairs = {
            (i, j)
            for english_tokens in english_spans.values()
            for spanish_tokens in spanish_spans.values()
            for i in english_tokens
            for j in spanish_tokens
        }
        possible |= pairs
        if len(english_spans) == 1 and len(spanish_spans) == 1:
            sure |= pairs
    return frozenset(sure), frozenset(possible)


def _verse_labels(entries: Sequence[str], testament: str) -> list[tuple[int, str, int, int]]:
    """``(entry_index, book, chapter, verse)`` for every verse slot, from chapter markers.

    Entry layout (KJV versification): module and testament headings, then per book a book
    heading, and per chapter a chapter heading followed by its verses.
    """
    chapters = []
    for index, entry in enumerate(entries):
        match = _CHAPTER_START.search(entry)
        if match:
            osis_id = dict(_ATTRIBUTE.findall(match.group(0))).get("osisID", "")
            book, _, number = osis_id.rpartition(".")
            if not book or not number.isdigit():
                raise ValueError(f"chapter marker without a usable osisID at entry {index}")
            chapters.append((index, book, int(number)))
    labels = []
    for position, (index, book, chapter) in enumerate(chapters):
        if position + 1 < len(chapters):
            end = chapters[position + 1][0]
            if chapters[position + 1][2] == 1:
                end -= 1  # the next book's heading slot
        else:
            end = len(entries)
        labels.extend((slot, book, chapter, slot - index) for slot in range(index + 1, end))
    shape = (len({book for _, book, _ in chapters}), len(chapters), len(labels))
    if shape != _KJV_SHAPE[testament]:
        raise ValueError(
            f"the {testament.upper()} has {shape} (books, chapters, verses); KJV "
            f"versification has {_KJV_SHAPE[testament]}: is this a KJV-versified module?"
        )
    return labels


def load_verse_pairs(
    *, module_root: str | os.PathLike | None = None, lowercase: bool = False
) -> list[VersePair]:
    """Every KJV / RV1909 verse pair with tokens and links, in canonical order.

    Args:
        module_root: SWORD library root (see :func:`sword_module_path`).
        lowercase: lower-case the tokens (the plain texts keep their case).
    """
    english_path = sword_module_path(ENGLISH_MODULE, module_root)
    spanish_path = sword_module_path(SPANISH_MODULE, module_root)
    pairs = _parsed_pairs(english_path, spanish_path)
    if not lowercase:
        return list(pairs)
    return [
        dataclasses.replace(
            pair,
            source=tuple(token.lower() for token in pair.source),
            target=tuple(token.lower() for token in pair.target),
        )
        for pair in pairs
    ]


@functools.lru_cache(maxsize=2)
def _parsed_pairs(english_path: Path, spanish_path: Path) -> tuple[VersePair, ...]:
    english_entries = {t: read_ztext(english_path, t) for t in ("ot", "nt")}
    spanish_entries = {t: read_ztext(spanish_path, t) for t in ("ot", "nt")}
    pairs = []
    for testament in ("ot", "nt"):
        english, spanish = english_entries[testament], spanish_entries[testament]
        if len(english) != len(spanish):
            raise ValueError(
                f"{ENGLISH_MODULE} and {SPANISH_MODULE} have {len(english)} and {len(spanish)} "
                f"{testament.upper()} entries; both must use KJV versification"
            )
        for slot, book, chapter, verse in _verse_labels(english, testament):
            source = parse_osis_verse(english[slot])
            target = parse_osis_verse(spanish[slot])
            if not source.tokens or not target.tokens:
                continue
            sure, possible = _links(source, target)
            pairs.append(
                VersePair(
                    book, chapter, verse, source.tokens, target.tokens, source.strongs,
                    target.strongs, sure, possible, source.text, target.text,
                )
            )
    return tuple(pairs)


def load_bible(
    *,
    module_root: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_length: int | None = None,
    lowercase: bool = False,
    min_strongs_overlap: float = 0.3,
) -> Splits[VersePair]:
    """English -> Spanish verse pairs split by book (see the module docstring).

    Args:
        module_root: SWORD library root; default ``$STRUCTATTN_SWORD_PATH`` or the system one.
        max_train: keep the first ``max_train`` training pairs after ``max_length`` filtering
            (canonical order is kept, so the sample is a fixed prefix of the Bible).
        max_length: drop training pairs with more tokens than this on either side; dev and
            test are never filtered.
        lowercase: lower-case the tokens.
        min_strongs_overlap: drop pairs (from every split) whose
            :attr:`VersePair.strongs_overlap` is below this; 0 keeps every pair.

    Returns:
        :class:`Splits` of :class:`VersePair` (defaults: train 28,433, dev 1,033, test 1,382).

    Raises:
        SwordModuleNotFoundError: the modules are not installed; the message gives the
            ``apt-get`` line.
    """
    for name, value in (("max_train", max_train), ("max_length", max_length)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if not isinstance(min_strongs_overlap, (int, float)) or not 0 <= min_strongs_overlap <= 1:
        raise ValueError(
            f"min_strongs_overlap must be a number in [0, 1], got {min_strongs_overlap!r}"
        )
    parts: dict[str, list[VersePair]] = {"train": [], "dev": [], "test": []}
    for pair in load_verse_pairs(module_root=module_root, lowercase=lowercase):
        if min_strongs_overlap > 0 and pair.strongs_overlap < min_strongs_overlap:
            continue
        if pair.book in DEV_BOOKS:
            parts["dev"].append(pair)
        elif pair.book in TEST_BOOKS:
            parts["test"].append(pair)
        elif max_length is None or max(len(pair.source), len(pair.target)) <= max_length:
            parts["train"].append(pair)
    if max_train is not None:
        del parts["train"][max_train:]
    return Splits(parts["train"], parts["dev"], parts["test"])
