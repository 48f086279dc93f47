"""Every ``python`` code block of the README and of every docs page runs as written.

Blocks of one page run in order in one namespace (a page is a tutorial), in a temporary working
directory so nothing is written into the repository.  A block preceded by the line
``<!-- no-run -->`` is shown but not executed (used only for commands that need data or hours).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_FENCE = re.compile(r"(<!-- no-run -->\s*\n)?```python\n(.*?)```", re.S)


def python_blocks(text: str) -> list[str]:
    """The runnable ``python`` blocks of a markdown text, in order."""
    return [code for skip, code in _FENCE.findall(text) if not skip]


def test_block_extraction_skips_marked_blocks():
    text = "```python\na = 1\n```\n<!-- no-run -->\n```python\nb = 2\n```\n```bash\nc\n```\n"
    assert python_blocks(text) == ["a = 1\n"]


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if python_blocks(p.read_text())],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_code_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, code in enumerate(python_blocks(page.read_text())):
        try:
            exec(compile(code, f"{page.name}[block {index}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(
                f"{page.relative_to(ROOT)} block {index} failed: {error!r}\n{code}"
            ) from error
