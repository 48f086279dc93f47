"""Pictures of alignments: heatmaps side by side (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["plot_alignments"]


def plot_alignments(
    alignments: Mapping[str, torch.Tensor],
    path: str | Path,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    title: str | None = None,
    columns: int | None = None,
) -> Path:
    """Draw each ``(T, S)`` alignment matrix as a heatmap, side by side, into ``path`` (PNG).

    Args:
        alignments: panel title -> weights ``(target_len, source_len)`` (soft attention,
            posterior marginals, or a one-hot hard alignment).
        path: output file; parent folders are created.
        source: tick labels of the source positions (columns).
        target: tick labels of the target positions (rows).
        title: figure title.
        columns: panels per row (default: all in one row).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not alignments:
        raise ValueError("alignments is empty: nothing to draw")
    shapes = {tuple(m.shape) for m in alignments.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every alignment must be one (target, source) matrix; got {shapes}")
    rows, cols = next(iter(shapes))
    width = max(3.0, 0.28 * cols + 1.5)
    columns = min(columns or len(alignments), len(alignments))
    grid_rows = -(-len(alignments) // columns)
    figsize = (width * columns, (0.28 * rows + 1.8) * grid_rows)
    fig, axes = plt.subplots(grid_rows, columns, figsize=figsize, squeeze=False)
    for ax in axes.flat[len(alignments):]:
        ax.axis("off")
    for ax, (name, matrix) in zip(axes.flat, alignments.items(), strict=False):
        ax.imshow(matrix.detach().float().cpu().numpy(), cmap="Greys", vmin=0.0, vmax=1.0,
                  aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("source")
        ax.set_ylabel("target")
        if source is not None:
            ax.set_xticks(range(cols), list(source)[:cols], fontsize=7, rotation=90)
        if target is not None:
            ax.set_yticks(range(rows), list(target)[:rows], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.35 / figsize[1]))
    else:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
