"""Plain-text tables of results: what ``structattn compare`` prints and ``results.json`` holds.

:func:`format_report` turns a comparison's results (see :mod:`structattn.app.compare`) into its
printed tables; :func:`format_rows` lays out any list of per-mode rows (the copy task's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from structattn.app.stats import ALIGNMENT_READINGS

__all__ = ["format_report", "format_rows", "number", "text_table"]


def _interval(cell: Mapping[str, float], key: str = "value") -> str:
    """``cell[key]`` with the interval ``[cell["low"], cell["high"]]`` around it."""
    return f"{number(cell[key])} [{number(cell['low'])}, {number(cell['high'])}]"


def number(value: float) -> str:
    """A value with three decimals, or one from 100 up."""
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def text_table(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned text columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def format_report(results: dict[str, Any]) -> str:
    """The printed tables of a ``results.json``: metrics with intervals, tests and the summary."""
    reference = results["reference_mode"]
    table, modes = results["table"], results["modes"]
    level = round(100 * results["statistics"]["confidence"])
    names = [row["metric"] for row in results["summary"]]
    plain = [n for n in names if not any(n.endswith(r) for r in ALIGNMENT_READINGS)]
    lines = []
    rows = [["metric", "mode", f"value [{level}% CI]", f"- {reference} [{level}% CI]", "p",
             "seeds mean +- sd"]]
    for name in plain:
        for mode in modes:
            cell = table[mode][name]
            test = cell.get("vs_" + reference)
            rows.append([name, mode, _interval(cell),
                         "" if test is None else _interval(test, "difference"),
                         "" if test is None else f"{test['p_value']:.3f}",
                         f"{number(cell['seed_mean'])} +- {number(cell['seed_std'])}"])
    lines.append(text_table(rows))
    aligned = [n for n in names if n not in plain]
    if aligned:
        lines.append("")
        lines.append("alignment against the reference links (linked target words only)")
        rows = [["mode", "reading", f"AER [{level}% CI]", "precision", "recall"]]
        for mode in modes:
            for reading in ALIGNMENT_READINGS:
                cells = [table[mode].get(f"{kind}_{reading}") for kind in
                         ("aer", "precision", "recall")]
                if None in cells:
                    continue
                rows.append([mode, reading,
                             _interval(cells[0]),
                             number(cells[1]["value"]), number(cells[2]["value"])])
        for baseline, cells in results.get("baselines", {}).items():
            rows.append([f"baseline: {baseline}", "links", _interval(cells["aer"]),
                         number(cells["precision"]["value"]), number(cells["recall"]["value"])])
        lines.append(text_table(rows))
    lines.append("")
    rows = [["mode", "objective", "ms/step", "train s (dev)", "test s", "best dev step"]]
    for run in results["runs"]:
        rows.append([f"{run['mode']} (seed {run['seed']})", run["objective_name"],
                     f"{run['ms_per_step']:.0f}",
                     f"{run['train_seconds']:.0f} ({run.get('dev_seconds', 0.0):.0f})",
                     f"{run['eval_seconds']:.0f}", str(run["best_step"])])
    lines.append(text_table(rows))
    lines.append("")
    lines.append(f"best mode per metric (lead over the runner-up: paired permutation test, "
                 f"significant at p < {results['statistics']['significance']}):")
    for row in results["summary"]:
        text = f"  {row['metric']}: {row['best']} ({number(row['value'])})"
        if "runner_up" in row:
            verdict = "significant" if row["significant"] else "not significant"
            text += (f", ahead of {row['runner_up']} by {number(row['lead'])}, "
                     f"p = {row['p_value']:.3f}: {verdict}")
        lines.append(text)
    return "\n".join(lines)


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with one line per row (each row holds a ``"mode"`` key)."""
    def text(value: Any) -> str:
        return number(value) if isinstance(value, float) else "-" if value is None else str(value)

    header = ["mode", *columns]
    return text_table([header] + [[text(row.get(c)) for c in header] for row in rows])
