"""Parallel text files: one example per line pair, checked line by line when loaded.

The user's own corpus enters the seq2seq models here: a source file and a target file with
the same number of lines, UTF-8, one segment per line, tokenised on whitespace (``"words"``)
or into characters (``"chars"``).  Every problem is reported while loading, naming the file
and the line, never later inside a training step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ParallelExample", "load_parallel_text", "TOKENIZERS"]


def _words(line: str) -> tuple[str, ...]:
    return tuple(line.split())


def _chars(line: str) -> tuple[str, ...]:
    return tuple(line.strip())


#: Tokenisers by name; add an entry to support another segmentation.
TOKENIZERS = {"words": _words, "chars": _chars}


@dataclass(frozen=True)
class ParallelExample:
    """One line pair: ``source`` and ``target`` token tuples and the 1-based ``line``."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    line: int


def _read_lines(path: Path, name: str) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{name} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{name} {path} is a directory, not a text file") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another
    decoded = []
    for number, raw in enumerate(lines, start=1):
        try:
            decoded.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{name} {path}, line {number}: invalid UTF-8 at byte {err.start} ({err.reason})"
            ) from None
    return decoded


def load_parallel_text(
    source_path: str | os.PathLike,
    target_path: str | os.PathLike,
    *,
    tokenize: str = "words",
) -> list[ParallelExample]:
    """Read aligned source and target lines into examples.

    Args:
        source_path, target_path: UTF-8 text files with one segment per line and the same
            number of lines.
        tokenize: a key of :data:`TOKENIZERS` (``"words"`` or ``"chars"``).

    Returns:
        One :class:`ParallelExample` per line pair, in file order.

    Raises:
        ValueError: a missing file, invalid UTF-8, different line counts, or a line with no
            token on either side, naming the file and the line.
    """
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be one of {sorted(TOKENIZERS)}, got {tokenize!r}")
    split = TOKENIZERS[tokenize]
    paths = {"source_path": Path(source_path), "target_path": Path(target_path)}
    lines = {name: _read_lines(path, name) for name, path in paths.items()}
    source_lines, target_lines = lines["source_path"], lines["target_path"]
    if len(source_lines) != len(target_lines):
        raise ValueError(
            f"source_path {paths['source_path']} has {len(source_lines)} lines but "
            f"target_path {paths['target_path']} has {len(target_lines)}; they must pair up"
        )
    if not source_lines:
        raise ValueError(f"source_path {paths['source_path']} has no lines")
    examples = []
    pairs = zip(source_lines, target_lines, strict=True)
    for number, (source_line, target_line) in enumerate(pairs, start=1):
        source, target = split(source_line), split(target_line)
        for name, tokens in (("source_path", source), ("target_path", target)):
            if not tokens:
                raise ValueError(
                    f"{name} {paths[name]}, line {number} is empty: every example needs at "
                    "least one token on each side"
                )
        examples.append(ParallelExample(source, target, number))
    return examples
