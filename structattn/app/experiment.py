"""Seq2seq experiments on real data: train one attention mode, evaluate it, compare modes.

A run is described by an :class:`ExperimentConfig`; :func:`train_mode` trains one mode with
the shared :class:`~structattn.app.train.Trainer` (atomic checkpoints, exact resume, bf16 on CUDA,
DDP under ``torchrun``), :func:`evaluate_mode` scores it (perplexity; WER/PER for G2P, BLEU and
alignment error rate against the Strong's links for the Bible), and :func:`compare_modes`
does both for several modes with the same data, seed and budget, then writes
``results.json`` and heatmaps of the same held-out examples for every mode.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from structattn.data.batching import Seq2SeqBatches, collate_seq2seq
from structattn.data.vocab import Vocab
from structattn.app.metrics import (
    alignment_error_rate,
    attention_to_links,
    bleu,
    perplexity,
    phoneme_error_rate,
    word_error_rate,
)
from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.app.train import Trainer, read_checkpoint
from structattn.app.plots import plot_alignments

__all__ = [
    "ExperimentConfig",
    "TaskData",
    "compare_modes",
    "evaluate_mode",
    "format_results",
    "load_model",
    "load_task",
    "plot_examples",
    "train_mode",
]

TASKS = ("g2p", "bible")


@dataclass
class ExperimentConfig:
    """Everything that defines a run (stored in checkpoints, so plain data only)."""

    task: str = "g2p"
    mode: str = "soft"
    steps: int = 3000
    batch_size: int = 64
    embed_dim: int = 64
    hidden: int = 128
    dropout: float = 0.1
    lr: float = 2e-3
    grad_clip: float = 5.0
    num_samples: int = 4
    temperature: float = 1.0
    max_train: int | None = None
    max_length: int | None = 40
    eval_size: int = 1000
    beam_size: int = 5
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int | None = None
    vocab_size: int = 8000

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "eval_size", "beam_size", "hidden", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class TaskData:
    """A task's splits, vocabularies and references."""

    name: str
    train: Any
    dev: Any
    test: Any
    source_vocab: Vocab
    target_vocab: Vocab
    sizes: dict[str, int] = field(default_factory=dict)


def load_task(config: ExperimentConfig) -> TaskData:
    """Load the task's data from installed packages (nothing is downloaded)."""
    if config.task == "g2p":
        from structattn.data.g2p import load_g2p

        splits = load_g2p(max_train=config.max_train)
        vocab_kwargs: dict[str, Any] = {}
    else:
        from structattn.data.bible import load_bible

        splits = load_bible(max_train=config.max_train, max_length=config.max_length,
                            lowercase=True)
        vocab_kwargs = {"max_size": config.vocab_size}
    source_vocab = Vocab.build([ex.source for ex in splits.train], **vocab_kwargs)
    target_vocab = Vocab.build([ex.target for ex in splits.train], **vocab_kwargs)
    return TaskData(config.task, splits.train, splits.dev, splits.test, source_vocab,
                    target_vocab, splits.sizes)


def build_model(config: ExperimentConfig, data: TaskData) -> Seq2Seq:
    """A fresh model for ``config.mode`` (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    vocab = data.target_vocab
    return Seq2Seq(
        len(data.source_vocab), len(vocab), mode=config.mode, embed_dim=config.embed_dim,
        hidden=config.hidden, dropout=config.dropout, num_samples=config.num_samples,
        temperature=config.temperature, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
    )


def train_mode(
    config: ExperimentConfig,
    data: TaskData,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
) -> tuple[Seq2Seq, dict[str, float]]:
    """Train one mode; returns the model and ``{"seconds", "ms_per_step", "final_loss"}``."""
    model = build_model(config, data)
    batches = Seq2SeqBatches(data.train, data.source_vocab, data.target_vocab,
                             config.batch_size, seed=config.seed)
    extra = {"config": asdict(config), "source_vocab": data.source_vocab.to_dict(),
             "target_vocab": data.target_vocab.to_dict()}
    trainer = Trainer(
        model, lambda params: torch.optim.Adam(params, lr=config.lr), batches,
        max_steps=config.steps, checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.checkpoint_every if checkpoint_dir else None,
        resume=resume, device=config.device, grad_clip=config.grad_clip, seed=config.seed,
        progress=progress, extra=extra, find_unused_parameters=True,
        # Resuming with other settings is refused; run length, evaluation and device may change.
        config={key: value for key, value in asdict(config).items() if key not in
                ("steps", "eval_size", "beam_size", "device", "checkpoint_every")},
        allow_config_change=allow_config_change,
    )
    start = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - start
    return trainer.model, {"seconds": seconds,
                           "ms_per_step": 1000 * seconds / max(1, config.steps),
                           "final_loss": summary.loss}


def load_model(path: str | Path, device: str = "cpu") -> tuple[Seq2Seq, ExperimentConfig, TaskData]:
    """Rebuild a trained model from a checkpoint written by :func:`train_mode`."""
    state = read_checkpoint(path, map_location=device)
    extra = state.get("extra") or {}
    if "config" not in extra or "source_vocab" not in extra:
        raise ValueError(f"{path} is a structattn checkpoint but not of a seq2seq experiment")
    try:
        config = ExperimentConfig(**extra["config"])
    except TypeError as err:  # a missing or unknown setting in a damaged checkpoint
        raise ValueError(f"{path} has a damaged experiment config: {err}") from err
    config.device = device
    data = load_task(config)
    data.source_vocab = Vocab.from_dict(extra["source_vocab"])
    data.target_vocab = Vocab.from_dict(extra["target_vocab"])
    model = build_model(config, data)
    model.load_state_dict(state["model"])
    return model.to(device), config, data


def _eval_batches(examples, data: TaskData, batch_size: int, device: str):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        indices = list(range(start, start + len(chunk)))
        yield collate_seq2seq(chunk, data.source_vocab, data.target_vocab, indices).to(device)


@torch.no_grad()
def evaluate_mode(
    model: Seq2Seq, config: ExperimentConfig, data: TaskData, split: str = "test"
) -> dict[str, float | None]:
    """Perplexity, task metrics and alignment metrics on the first ``eval_size`` examples."""
    model.eval()
    examples = list(getattr(data, split))[:config.eval_size]
    total_nll, tokens = 0.0, 0
    hypotheses: list[list[str]] = []
    predicted: dict[str, list[set]] = {"prior_argmax": [], "posterior_map": [],
                                       "posterior_marginals": []}
    for batch in _eval_batches(examples, data, config.batch_size, config.device):
        total_nll -= float(model.log_likelihood(batch).sum())
        tokens += batch.num_target_tokens
        max_length = int(batch.target_mask.sum(-1).max()) + 10
        for ids in model.beam_search(batch.source, batch.source_mask, config.beam_size,
                                     max_length):
            hypotheses.append(data.target_vocab.decode(ids))
        if config.task == "bible":
            found = model.alignments(batch)
            for row in range(len(batch)):
                source_mask = batch.source_mask[row]
                # The Strong's links cover tagged words only: score the target words that
                # have a reference link (eos and untagged words are not judged).
                target_mask = torch.zeros_like(batch.target_mask[row, 1:])
                linked = sorted({t for _, t in examples[int(batch.indices[row])].possible})
                target_mask[linked] = True
                for key, matrix, threshold in (("prior_argmax", found["prior"], None),
                                               ("posterior_map", found["posterior"], None),
                                               ("posterior_marginals", found["posterior"], 0.5)):
                    predicted[key].append(attention_to_links(
                        matrix[row], threshold=threshold, source_mask=source_mask,
                        target_mask=target_mask))
    result: dict[str, float | None] = {
        "ppl": perplexity(total_nll, tokens) if tokens else math.nan,
        "eval_examples": float(len(examples)),
    }
    if config.task == "g2p":
        references = [list(ex.references) for ex in examples]
        result["wer"] = word_error_rate(hypotheses, references)
        result["per"] = phoneme_error_rate(hypotheses, references)
    else:
        result["bleu"] = bleu(hypotheses, [list(ex.target) for ex in examples])
        sure = [set(ex.sure) for ex in examples]
        possible = [set(ex.possible) for ex in examples]
        for key, links in predicted.items():
            scores = alignment_error_rate(links, sure, possible)
            result[f"aer_{key}"] = scores.aer
            result[f"precision_{key}"] = scores.precision
            result[f"recall_{key}"] = scores.recall
    return result


@torch.no_grad()
def plot_examples(
    models: dict[str, Seq2Seq], config: ExperimentConfig, data: TaskData, out: Path,
    count: int = 2, split: str = "test",
) -> list[Path]:
    """Heatmaps of the same held-out examples for every mode: attention next to posterior."""
    examples = list(getattr(data, split))[:count]
    paths = []
    batch = collate_seq2seq(examples, data.source_vocab, data.target_vocab).to(config.device)
    found = {mode: model.eval().alignments(batch) for mode, model in models.items()}
    for row, example in enumerate(examples):
        source_len = int(batch.source_mask[row].sum())
        target_len = int(batch.target_mask[row, 1:].sum())
        panels = {}
        for key, label in (("prior", "attention"), ("posterior", "posterior")):
            for mode, alignments in found.items():
                panels[f"{mode}: {label}"] = alignments[key][row, :target_len, :source_len]
        target = list(example.target) + ["</s>"]
        path = out / f"{config.task}_example{row}.png"
        plot_alignments(panels, path, source=list(example.source), target=target,
                        title=f"{config.task}: attention (top) vs exact hard-attention "
                        "posterior (bottom)", columns=len(found))
        paths.append(path)
    return paths


def format_results(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table, one line per mode (``rows`` hold a ``"mode"`` key).

    ``columns``: metric keys to show, in order; default the usual seq2seq metrics present.
    """
    preferred = ["ppl", "wer", "per", "bleu", "aer_prior_argmax", "aer_posterior_map",
                 "aer_posterior_marginals", "ms_per_step", "seconds"]
    chosen = columns or [c for c in preferred if any(c in row for row in rows)]
    columns = ["mode"] + chosen
    width = {c: max(len(c), 9) for c in columns}
    width["mode"] = max(len("mode"), *(len(row["mode"]) for row in rows))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
        return "-" if value is None else str(value)

    lines = ["  ".join(c.ljust(width[c]) for c in columns)]
    for row in rows:
        lines.append("  ".join(cell(row.get(c)).ljust(width[c]) for c in columns))
    return "\n".join(lines)


def compare_modes(
    base: ExperimentConfig, modes: list[str], out: Path | None, progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every mode with the same data, seed and budget."""
    data = load_task(base)
    print(f"{base.task}: train {len(data.train)}, dev {len(data.dev)}, test {len(data.test)}; "
          f"vocab {len(data.source_vocab)} -> {len(data.target_vocab)}; "
          f"{base.steps} steps per mode")
    rows, models = [], {}
    for mode in modes:
        config = ExperimentConfig(**{**asdict(base), "mode": mode})
        checkpoint_dir = None if out is None else out / "checkpoints" / mode
        model, timing = train_mode(config, data, checkpoint_dir, progress=progress)
        metrics = evaluate_mode(model, config, data)
        rows.append({"mode": mode, **metrics, **timing})
        models[mode] = model
        if progress:
            print(format_results(rows[-1:]))
    print(format_results(rows))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        paths = plot_examples(models, base, data, out)
        print(f"wrote {out / 'results.json'} and {', '.join(str(p) for p in paths)}")
    return rows
