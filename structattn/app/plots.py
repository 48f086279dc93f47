"""Figures of a comparison (matplotlib, no display needed; imported only when drawing).

- :func:`plot_alignments`: alignment matrices side by side, each with a colorbar, optional
  reference links drawn as squares, and caption lines (e.g. the model's own output).
- :func:`plot_summary`: every metric with its confidence interval per mode.
- :func:`plot_dev_curves`: dev perplexity against steps, one line per mode and seed.
- :func:`plot_comparison`: all of the above for a finished comparison, with examples chosen
  where the soft attention and the hard posterior disagree most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["disagreement", "plot_alignments", "plot_comparison", "plot_dev_curves",
           "plot_summary", "pyplot", "save_figure"]

# Weights are drawn on a square-root scale, so a 5% weight is visible next to a 90% one.
_GAMMA = 0.5


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (its folder made if missing), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _as_array(matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        return matrix.detach().float().cpu().numpy()
    return np.asarray(matrix, dtype=np.float64)


def plot_alignments(
    alignments: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    title: str | None = None,
    columns: int | None = None,
    gold: set[tuple[int, int]] | None = None,
    captions: Sequence[str] = (),
    target_label: str = "target",
) -> Path:
    """Draw each ``(T, S)`` alignment matrix as a heatmap with a colorbar into ``path`` (PNG).

    Args:
        alignments: panel title -> weights ``(target_len, source_len)`` (soft attention,
            posterior marginals, or a one-hot hard alignment).
        path: output file; parent folders are created.
        source: tick labels of the source positions (columns).
        target: tick labels of the target positions (rows).
        title: figure title.
        columns: panels per row (default: all in one row).
        gold: reference links ``(source, target)`` outlined in every panel.
        captions: lines printed under the title (e.g. reference and predicted outputs).
        target_label: the y-axis label (what the rows are).
    """
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle

    plt = pyplot()
    if not alignments:
        raise ValueError("alignments is empty: nothing to draw")
    shapes = {tuple(np.shape(m)) for m in alignments.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every alignment must be one (target, source) matrix; got {shapes}")
    rows, cols = next(iter(shapes))
    columns = min(columns or len(alignments), len(alignments))
    grid_rows = -(-len(alignments) // columns)
    cell = 0.24
    panel_w = max(2.6, cell * cols + 1.6)
    panel_h = max(2.2, cell * rows + 1.4)
    text = "\n".join(([title] if title else []) + list(captions))
    header = 0.19 * (text.count("\n") + 1) + 0.15 if text else 0.1
    longest_line = max((len(line) for line in text.splitlines()), default=0)
    # monospace 9 pt is about 0.08 inch a character: the caption is never cut off
    figsize = (max(panel_w * columns, 0.085 * longest_line + 0.4), panel_h * grid_rows + header)
    fig, axes = plt.subplots(grid_rows, columns, figsize=figsize, squeeze=False)
    for ax in axes.flat[len(alignments):]:
        ax.axis("off")
    font = 8 if max(rows, cols) <= 20 else 6
    for ax, (name, matrix) in zip(axes.flat, alignments.items(), strict=False):
        image = ax.imshow(_as_array(matrix), cmap="viridis", norm=PowerNorm(_GAMMA, 0.0, 1.0),
                          aspect="auto", interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        bar.set_ticks([0.0, 0.05, 0.25, 0.5, 1.0])
        bar.ax.tick_params(labelsize=7)
        for s, t in gold or ():
            if t < rows and s < cols:
                ax.add_patch(Rectangle((s - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red",
                                       linewidth=1.2))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("source", fontsize=8)
        ax.set_ylabel(target_label, fontsize=8)
        if source is not None:
            ax.set_xticks(range(cols), list(source)[:cols], fontsize=font, rotation=90)
        if target is not None:
            ax.set_yticks(range(rows), list(target)[:rows], fontsize=font)
    top = 1.0 - header / figsize[1]
    if text:
        fig.text(0.01, 0.995, text, ha="left", va="top", fontsize=9, family="monospace")
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    return save_figure(fig, path)


def plot_summary(results: Mapping[str, Any], path: str | Path) -> Path:
    """Every metric of a ``results.json`` as one panel: value and interval per mode."""
    from matplotlib.ticker import MaxNLocator

    from structattn.app.stats import metric_label

    plt = pyplot()
    table, modes = results["table"], results["modes"]
    names = [row["metric"] for row in results["summary"]]
    if not names:
        raise ValueError("results hold no metric to draw")
    columns = min(3, len(names))
    grid_rows = -(-len(names) // columns)
    height = 0.35 * len(modes) + 1.2
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, height * grid_rows),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    level = round(100 * results["statistics"]["confidence"])
    for ax, name in zip(axes.flat, names, strict=False):
        values = np.array([table[m][name]["value"] for m in modes])
        low = np.array([table[m][name]["low"] for m in modes])
        high = np.array([table[m][name]["high"] for m in modes])
        positions = np.arange(len(modes))
        ax.errorbar(values, positions, xerr=[values - low, high - values], fmt="o",
                    capsize=3, color="tab:blue")
        for baseline, cells in results.get("baselines", {}).items():
            kind = name.split("_", 1)[0]
            if name.count("_") and kind in cells:
                ax.axvline(cells[kind]["value"], color="tab:red", linestyle="--", linewidth=1)
                ax.text(cells[kind]["value"], -0.6, baseline, color="tab:red", fontsize=7,
                        ha="center", va="center")
        ax.set_yticks(positions, modes, fontsize=8)
        ax.set_ylim(len(modes) - 0.5, -0.9)  # first mode on top, room for baseline labels
        ax.set_title(metric_label(name), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # few, short tick labels that never overlap
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{results['task']}: test metrics with {level}% bootstrap intervals "
                 f"({results['data']['test_evaluated']} examples)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dev_curves(results: Mapping[str, Any], path: str | Path) -> Path:
    """Dev perplexity against training steps, one line per run; the selected step marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {mode: f"C{i}" for i, mode in enumerate(results["modes"])}
    for run in results["runs"]:
        curve = run["dev_curve"]
        if not curve:
            continue
        steps = [point["step"] for point in curve]
        ppl = [point["ppl"] for point in curve]
        ax.plot(steps, ppl, marker=".", color=colors[run["mode"]],
                label=f"{run['mode']} (seed {run['seed']})")
        chosen = [p for p in curve if p["step"] == run["best_step"]]
        if chosen:
            ax.plot(chosen[0]["step"], chosen[0]["ppl"], marker="*", markersize=12,
                    color=colors[run["mode"]])
    ax.set_xlabel("training step")
    ax.set_ylabel("dev perplexity")
    ax.set_title(f"{results['task']}: dev perplexity (star: the step evaluated on test)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def disagreement(soft: np.ndarray, hard: np.ndarray) -> float:
    """Mean total-variation distance between the rows of two ``(T, S)`` alignment matrices."""
    if soft.shape != hard.shape:
        raise ValueError(f"soft and hard must have the same shape, got {soft.shape} and "
                         f"{hard.shape}")
    return float(0.5 * np.abs(soft - hard).sum(-1).mean()) if soft.size else 0.0


def plot_comparison(results: Mapping[str, Any], runs: Sequence[Any], config: Any, task: Any,
                    examples: Sequence[Any], out: Path, count: int = 2) -> list[Path]:
    """Summary, dev curves and example figures of a finished comparison.

    The examples are the short ones where the reference mode's attention and the other modes'
    exact posteriors disagree most.  Without reference links each mode gets a row (attention,
    posterior); with them (Bible) one row compares the reference mode's attention, every other
    mode's posterior and the reference links.
    """
    paths = [plot_summary(results, out / f"{config.task}_summary.png"),
             plot_dev_curves(results, out / f"{config.task}_dev_curves.png")]
    first = {}
    for run in runs:
        first.setdefault(run.mode, run.evaluation)
    reference = results["reference_mode"]
    others = [mode for mode in first if mode != reference] or [reference]
    with_links = bool(getattr(task, "has_gold_links", False))
    longest = 16 if with_links else 24  # keeps labels readable at normal size
    # short enough to read, long enough to show an alignment
    candidates = [i for i, ex in enumerate(examples)
                  if 5 <= len(ex.target) and len(ex.source) <= longest
                  and len(ex.target) <= longest]
    if not candidates:  # every evaluated example is long: draw the shortest ones
        candidates = sorted(range(len(examples)),
                            key=lambda i: max(len(examples[i].source), len(examples[i].target)))
        candidates = candidates[:count]
    score = {i: max(disagreement(first[reference].attention[i], first[m].posterior[i])
                    for m in others) for i in candidates}
    for rank, index in enumerate(sorted(candidates, key=lambda i: -score[i])[:count]):
        example = examples[index]
        captions = [f"{'reference':<16}: {' '.join(example.target)}"] + [
            f"{mode + ' (beam)':<16}: {' '.join(evaluation.hypotheses[index])}"
            for mode, evaluation in first.items()]
        gold = None
        if with_links:
            gold = {(s, t) for s, t in example.sure}
            panels = {f"{reference}: attention p(z|x,y<t)": first[reference].attention[index]}
            panels.update({f"{mode}: posterior p(z|x,y)": first[mode].posterior[index]
                           for mode in others})
            links = np.zeros_like(first[reference].attention[index])
            for s, t in example.possible:
                links[t, s] = 0.5
            for s, t in gold:
                links[t, s] = 1.0
            panels["reference links (sure 1, possible 0.5)"] = links
            columns = 3
        else:
            panels = {}
            for mode, evaluation in first.items():
                panels[f"{mode}: attention p(z|x,y<t)"] = evaluation.attention[index]
                panels[f"{mode}: posterior p(z|x,y)"] = evaluation.posterior[index]
            columns = 2
        title = (f"{config.task} '{task.label(example)}': rows = reference target "
                 f"(teacher-forced); {reference}-attention vs posterior disagreement "
                 f"{score[index]:.2f}" + ("; red squares = sure links" if gold else "")
                 + "\nposterior = exact p(z|x,y) of each model's hard-attention reading "
                 "(soft model: the same network reading one source position)")
        paths.append(plot_alignments(
            panels, out / f"{config.task}_example{rank}.png", source=list(example.source),
            target=list(example.target) + ["</s>"], title=title, columns=columns, gold=gold,
            captions=captions, target_label="reference target"))
    return paths
