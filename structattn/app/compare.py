"""Compare attention modes on one task: same data, budget and seeds; intervals and paired tests.

:func:`compare_modes` trains every mode (``seeds`` runs each), keeps each run's best-dev
parameters, scores the whole test split, and reports every metric with a 95% bootstrap
interval over test examples, each mode's difference from soft attention with a paired
permutation test, the spread across seeds, and per metric the best mode and whether its lead
over the runner-up is significant.  On tasks with reference links the alignment baselines of
:mod:`structattn.app.alignment_baselines` are scored on the same verses.  With ``out`` it writes
``results.json`` (configuration, data sizes, versions, timings, per-example counts) and figures.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from structattn.app.alignment_baselines import ALIGNMENT_BASELINES
from structattn.app.architectures import get_architecture
from structattn.app.config import TaskData
from structattn.app.evaluation import Evaluation, evaluate_mode, gold_target_mask
from structattn.app.experiment import (
    ExperimentConfig,
    TrainResult,
    eval_batches,
    load_task,
    train_mode,
)
from structattn.app.outputs import RESULTS_NAME, claim_output, write_json
from structattn.app.report import format_report, number
from structattn.app.stats import (
    METRICS,
    alignment_counts,
    alignment_metrics,
    bootstrap_interval,
    metric_label,
    paired_test,
    seed_spread,
)
from structattn.app.tasks import Seq2SeqTask, get_task

__all__ = ["RESULTS_FORMAT", "Run", "compare_modes", "metric_label", "mode_descriptions",
           "objective_name"]

RESULTS_FORMAT = "structattn.compare"
SIGNIFICANCE = 0.05

def mode_descriptions() -> dict[str, str]:
    """Mode name -> one-line description, read from the mode registry or ``Seq2Seq``'s docstring."""
    from structattn.models import seq2seq

    descriptions: dict[str, str] = {}
    registry = seq2seq.MODES
    if isinstance(registry, dict):
        for name, mode in registry.items():
            doc = (getattr(mode, "__doc__", None) or "").strip()
            descriptions[name] = doc.splitlines()[0] if doc else ""
    # the docstring lists "- ``a``, ``b``: text" bullets
    doc = seq2seq.Seq2Seq.__doc__ or ""
    for block in doc.split("\n    - ")[1:]:
        head, _, text = block.partition(":")
        text = " ".join(text.split("\n\n")[0].split()).replace("``", "").rstrip(".")
        for name in (part.strip(" `") for part in head.split(",")):
            if name in registry and not descriptions.get(name):
                descriptions[name] = text.replace("that normaliser", f"the {name} normaliser")
    return {name: descriptions.get(name, "") for name in registry}


def objective_name(mode: str) -> str:
    """What ``mode`` minimises during training, per target token: the ``objective`` its mode
    class declares (RNN modes first, then Transformer-only ones), so no column of the results
    mixes different objectives."""
    from structattn.models.modes import SEQ2SEQ_MODES
    from structattn.models.transformer import TRANSFORMER_MODES

    for registry in (SEQ2SEQ_MODES, TRANSFORMER_MODES):
        declared = getattr(registry.get(mode), "objective", "")
        if declared:
            return declared
    return f"training loss of mode {mode!r}"


@dataclass
class Run:
    """One trained and evaluated (mode, seed)."""

    mode: str
    seed: int
    train: TrainResult
    evaluation: Evaluation
    eval_seconds: float
    #: what the architecture reports about the trained model (attention sparsity, alphas)
    diagnostics: dict[str, Any]


def _environment(device: str) -> dict[str, Any]:
    import pyro
    import scipy

    import structattn

    return {"structattn": getattr(structattn, "__version__", "unknown"),
            "torch": torch.__version__, "pyro": pyro.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "device": device,
            "threads": torch.get_num_threads()}


def _pooled(runs: Sequence[Run], name: str) -> np.ndarray:
    """Per-example counts of a metric summed over seeds (one corpus of every seed's output)."""
    return np.sum([run.evaluation.counts[name] for run in runs], axis=0)


def _run_row(run: Run, metrics: Sequence[str]) -> str:
    values = ", ".join(f"{name} {number(run.evaluation.metrics[name])}" for name in metrics
                       if name in run.evaluation.metrics)
    row = (f"  {run.mode} seed {run.seed}: {values}; best dev step {run.train.best_step}, "
           f"{run.train.ms_per_step:.0f} ms/step")
    sparsity = run.diagnostics.get("attention_sparsity")
    if sparsity:
        row += "; exact zeros: " + ", ".join(
            f"{name.removeprefix('decoder.layers.')} {share:.0%}"
            for name, share in sparsity.items())
    for name, alphas in run.diagnostics.get("alphas", {}).items():
        row += f"; alphas {name}: " + " ".join(f"{alpha:.2f}" for alpha in alphas)
    return row


def compare_modes(
    base: ExperimentConfig,
    modes: Sequence[str],
    out: Path | None = None,
    *,
    seeds: int = 1,
    progress: bool = True,
    confidence: float = 0.95,
    resamples: int = 1000,
    plots: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every mode with the same data, budget and seeds; returns the results.

    Args:
        base: the run settings (``mode`` is replaced by each of ``modes``; seeds are
            ``base.seed, base.seed + 1, ...``).
        modes: mode names (distinct).
        out: folder for ``results.json``, figures and checkpoints; ``None`` writes nothing.
        seeds: training seeds per mode.
        progress: bars for training and test evaluation, and dev lines (result rows and the
            tables are printed regardless).
        confidence: coverage of the intervals.
        resamples: bootstrap and permutation resamples.
        plots: draw figures into ``out``.
        overwrite: replace the results of an earlier comparison in ``out`` (refused
            otherwise, before any training; a second live run into ``out`` is always refused).
    """
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct mode names, got {list(modes)!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    for mode in modes:
        base.replace(mode=mode)  # validates every name before any data is loaded
    task = get_task(base.task)
    assert isinstance(task, Seq2SeqTask)
    out = None if out is None else Path(out)
    with claim_output(out, overwrite):
        return _compare(base, task, modes, out, seeds, progress, confidence, resamples, plots)


def _compare(base: ExperimentConfig, task: Seq2SeqTask, modes: Sequence[str], out: Path | None,
             seeds: int, progress: bool, confidence: float, resamples: int,
             plots: bool) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_task(base)
    examples = list(data.test)[:base.eval_size]
    print(f"{base.task}: train {len(data.train)}, dev {len(data.dev)} "
          f"({min(len(data.dev), base.dev_size or len(data.dev))} used for model selection), "
          f"test {len(data.test)} ({len(examples)} evaluated); vocab {len(data.source_vocab)} "
          f"-> {len(data.target_vocab)}; {base.steps} steps x {seeds} seed(s) per mode; "
          f"dev every {base.dev_every} steps")
    ignored = get_architecture(base.arch).ignored_options(base)
    if ignored:
        print(f"note: arch {base.arch!r} does not read {', '.join(ignored)} (set by the task's "
              "defaults or the command line); its models run without them")
    runs: list[Run] = []
    for index, mode in enumerate(modes, start=1):
        print(f"mode {index}/{len(modes)}: {mode} (minimises {objective_name(mode)})",
              flush=True)
        for offset in range(seeds):
            config = base.replace(mode=mode, seed=base.seed + offset)
            checkpoints = None if out is None else out / "checkpoints" / f"{mode}-seed{config.seed}"
            # (the comparison holds out/: checkpoints left by an interrupted one are replaced)
            model, trained = train_mode(config, data, checkpoints, progress=progress,
                                        overwrite=True)
            clock = time.perf_counter()
            evaluation = evaluate_mode(model, config, data, examples=examples, progress=progress)
            seconds = time.perf_counter() - clock
            batch = next(eval_batches(examples[:64], data, 64, config.device))
            diagnostics = get_architecture(config.arch).diagnostics(model.eval(), batch)
            run = Run(mode, config.seed, trained, evaluation, seconds, diagnostics)
            runs.append(run)
            print(_run_row(run, task.metrics), flush=True)
    baselines = _baselines(task, data, examples) if task.has_gold_links else {}
    results = _results(base, task, data, examples, list(modes), runs, baselines, seeds,
                       confidence, resamples)
    results["wall_seconds"] = time.perf_counter() - started
    print()
    print(format_report(results))
    if out is not None:
        written = [write_json(out / RESULTS_NAME, results)]
        if plots:
            from structattn.app.plots import plot_comparison

            written += plot_comparison(results, runs, base, task, examples, out)
        print("wrote " + ", ".join(str(path) for path in written))
    return results


def _baselines(task: Seq2SeqTask, data: TaskData, examples: Sequence[Any]
               ) -> dict[str, np.ndarray]:
    """Per-example alignment counts of every registered baseline on ``examples``."""
    counts = {}
    for name, cls in ALIGNMENT_BASELINES.items():
        baseline = cls()
        baseline.fit(data.train)
        rows = []
        for example, found in zip(examples, baseline.align_many(examples), strict=True):
            mask = gold_target_mask(example, task, len(example.target) + 1)
            links = {(s, t) for s, t in found if bool(mask[t])}
            rows.append(alignment_counts(links, set(example.sure), set(example.possible)))
        counts[name] = np.asarray(rows, dtype=np.float64)
    return counts


def _results(base: ExperimentConfig, task: Seq2SeqTask, data: TaskData,
             examples: Sequence[Any], modes: list[str], runs: list[Run],
             baselines: dict[str, np.ndarray], seeds: int, confidence: float,
             resamples: int) -> dict[str, Any]:
    by_mode = {mode: [run for run in runs if run.mode == mode] for mode in modes}
    reference = "soft" if "soft" in by_mode else modes[0]
    names = [name for name in task.metrics if name in runs[0].evaluation.counts]
    table: dict[str, dict[str, Any]] = {}
    for mode, mode_runs in by_mode.items():
        entry: dict[str, Any] = {}
        for name in names:
            metric = METRICS[name]
            pooled = _pooled(mode_runs, name)
            interval = bootstrap_interval(metric, pooled, confidence=confidence,
                                          resamples=resamples)
            spread = seed_spread([run.evaluation.metrics[name] for run in mode_runs])
            cell: dict[str, Any] = {**interval._asdict(), "seed_mean": spread.mean,
                                    "seed_std": spread.std}
            if mode != reference:
                test = paired_test(metric, pooled, _pooled(by_mode[reference], name),
                                   confidence=confidence, resamples=resamples)
                cell["vs_" + reference] = test._asdict()
            entry[name] = cell
        table[mode] = entry
    summary = []
    for name in names:
        metric = METRICS[name]
        ranked = sorted(modes, key=lambda m: table[m][name]["value"],
                        reverse=metric.higher_is_better)
        line: dict[str, Any] = {"metric": name, "best": ranked[0],
                                "value": table[ranked[0]][name]["value"]}
        if len(ranked) > 1:
            lead = paired_test(metric, _pooled(by_mode[ranked[0]], name),
                               _pooled(by_mode[ranked[1]], name), confidence=confidence,
                               resamples=resamples)
            line.update(runner_up=ranked[1], lead=abs(lead.difference), p_value=lead.p_value,
                        significant=bool(lead.p_value < SIGNIFICANCE
                                         and metric.better(table[ranked[0]][name]["value"],
                                                           table[ranked[1]][name]["value"])))
        summary.append(line)
    baseline_table = {}
    for baseline, counts in baselines.items():
        baseline_table[baseline] = {
            metric.name.rsplit("_", 1)[0]: bootstrap_interval(
                metric, counts, confidence=confidence, resamples=resamples)._asdict()
            for metric in alignment_metrics("baseline")}
    return {
        "format": RESULTS_FORMAT,
        "version": 1,
        "task": base.task,
        "modes": modes,
        "reference_mode": reference,
        "config": asdict(base),
        "ignored_options": list(get_architecture(base.arch).ignored_options(base)),
        "seeds": [base.seed + k for k in range(seeds)],
        "data": {**data.sizes, "source_vocab": len(data.source_vocab),
                 "target_vocab": len(data.target_vocab),
                 "dev_used": min(len(data.dev), base.dev_size or len(data.dev)),
                 "test_evaluated": len(examples)},
        "environment": _environment(base.device),
        "statistics": {"confidence": confidence, "resamples": resamples,
                       "interval": "percentile bootstrap over test examples, the same "
                                   "resamples for every mode (paired)",
                       "test": "two-sided paired permutation test (scipy.stats."
                               "permutation_test, permutation_type='samples')",
                       "seeds": "cells pool every seed's output per example; seed_mean and "
                                "seed_std are the spread of the per-seed values",
                       "significance": SIGNIFICANCE},
        "table": table,
        "summary": summary,
        "baselines": baseline_table,
        "runs": [{
            "mode": run.mode, "seed": run.seed, "objective_name": objective_name(run.mode),
            "final_train_objective": run.train.objective, "best_step": run.train.best_step,
            "train_seconds": run.train.seconds, "dev_seconds": run.train.dev_seconds,
            "ms_per_step": run.train.ms_per_step,
            "eval_seconds": run.eval_seconds, "dev_curve": run.train.dev_curve,
            "metrics": run.evaluation.metrics,
            "diagnostics": run.diagnostics,
            "per_example": {name: counts.tolist()
                            for name, counts in run.evaluation.counts.items()},
            "per_example_columns": {name: list(METRICS[name].columns)
                                    for name in run.evaluation.counts},
        } for run in runs],
    }
