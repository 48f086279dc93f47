"""One seq2seq run: its configuration, the model, training with dev-set model selection.

A run is described by an :class:`ExperimentConfig`; :func:`train_mode` trains one mode with
the shared :class:`~structattn.app.training.Trainer`, evaluates the dev perplexity every
``dev_every`` steps (the curve is kept) and returns the model with the parameters of the best
dev evaluation; :func:`load_model` rebuilds a model from a checkpoint.  Scoring lives in
:mod:`structattn.app.evaluation`, the comparison of several modes in :mod:`structattn.app.compare`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from structattn.app.architectures import get_architecture
from structattn.app.config import RunSettings, TaskData
from structattn.app.tasks import TASKS, Seq2SeqTask, get_task
from structattn.app.training import Trainer, read_checkpoint
from structattn.data.batching import Seq2SeqBatches, collate_seq2seq
from structattn.data.vocab import Vocab
from structattn.models.seq2seq import Seq2Seq

__all__ = [
    "ExperimentConfig",
    "TrainResult",
    "build_model",
    "dev_log_likelihood",
    "eval_batches",
    "load_model",
    "load_task",
    "train_mode",
]


#: settings a resumed run may change (run length, evaluation, device); any other difference
#: is refused unless ``allow_config_change``
_MAY_CHANGE = frozenset({"steps", "eval_size", "dev_size", "dev_every", "beam_size", "device",
                         "checkpoint_every"})


class ExperimentConfig(RunSettings):
    """The settings of one run (:class:`~structattn.app.config.RunSettings`), with ``task``
    a registered seq2seq task and ``mode`` one of the modes of ``arch``."""

    def __post_init__(self) -> None:
        if self.task not in TASKS or not issubclass(TASKS[self.task], Seq2SeqTask):
            seq2seq = sorted(n for n, t in TASKS.items() if issubclass(t, Seq2SeqTask))
            raise ValueError(f"task must be one of {seq2seq}, got {self.task!r}")
        modes = get_architecture(self.arch).modes()
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes} (arch {self.arch!r}), "
                             f"got {self.mode!r}")
        super().__post_init__()


@dataclass
class TrainResult:
    """What :func:`train_mode` returns besides the model.

    Attributes:
        seconds: wall time of training, dev evaluations included.
        ms_per_step: milliseconds per training step, dev evaluations excluded.
        objective: what the mode minimised (its training loss per target token) at the end,
            averaged over the last logging window; see ``objective_name`` in the results.
        best_step: the step whose parameters are returned (best dev perplexity).
        dev_curve: ``[{"step", "ppl"}, ...]`` every dev evaluation.
        dev_seconds: wall time of the dev evaluations.
    """

    seconds: float
    ms_per_step: float
    objective: float
    best_step: int
    dev_curve: list[dict[str, float]] = field(default_factory=list)
    dev_seconds: float = 0.0


def load_task(config: ExperimentConfig) -> TaskData:
    """Load the data of ``config.task`` (from installed packages; nothing is downloaded)."""
    task = get_task(config.task)
    assert isinstance(task, Seq2SeqTask)  # guaranteed by ExperimentConfig validation
    return task.load(config)


def build_model(config: ExperimentConfig, data: TaskData) -> Seq2Seq:
    """A fresh model of ``config.arch`` for ``config.mode`` (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    return get_architecture(config.arch).build(config, data)


def eval_batches(examples: Sequence[Any], data: TaskData, batch_size: int, device: str):
    """Batches of ``examples`` in order; ``batch.indices`` are positions in ``examples``."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        indices = list(range(start, start + len(chunk)))
        yield collate_seq2seq(chunk, data.source_vocab, data.target_vocab, indices).to(device)


@torch.no_grad()
def dev_log_likelihood(model: Seq2Seq, examples: Sequence[Any], data: TaskData,
                       batch_size: int, device: str) -> tuple[float, int]:
    """Summed ``log p(y | x)`` of ``examples`` under the model, and the target token count."""
    total, tokens = 0.0, 0
    for batch in eval_batches(examples, data, batch_size, device):
        total += float(model.log_likelihood(batch).sum())
        tokens += int(batch.target_mask[:, 1:].sum())
    return total, tokens


def _sorted_by_length(examples: Sequence[Any]) -> list[Any]:
    # similar lengths together: less padding, and the exact modes' cost tracks real sizes
    return sorted(examples, key=lambda ex: (len(ex.source), len(ex.target)))


def train_mode(
    config: ExperimentConfig,
    data: TaskData,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    allow_config_change: bool = False,
    overwrite: bool = False,
) -> tuple[Seq2Seq, TrainResult]:
    """Train one mode, selecting the parameters with the best dev perplexity.

    Args:
        config: the run.
        data: the task's data.
        checkpoint_dir: where the trainer writes ``checkpoint.pt`` (the last step, for resume).
        resume: continue from ``checkpoint_dir/checkpoint.pt``.
        progress: show a bar over the step budget.
        report: receives one line per dev evaluation (default: printed above the bar when
            ``progress``, silent otherwise).
        allow_config_change: with ``resume``, continue even if the checkpoint was written with
            other settings (refused otherwise, listing the differences).
        overwrite: without ``resume``, replace the checkpoint of an earlier run in
            ``checkpoint_dir`` (refused otherwise, with
            :class:`~structattn.app.training.RunExistsError`).
    """
    from tqdm.auto import tqdm

    model = build_model(config, data)
    batches = Seq2SeqBatches(data.train, data.source_vocab, data.target_vocab,
                             config.batch_size, seed=config.seed)
    dev = _sorted_by_length(list(data.dev)[:config.dev_size])
    extra = {"config": asdict(config), "source_vocab": data.source_vocab.to_dict(),
             "target_vocab": data.target_vocab.to_dict()}
    best: dict[str, Any] = {"ppl": math.inf, "step": 0, "state": None, "seconds": 0.0}
    curve: list[dict[str, float]] = []
    bar = tqdm(total=config.steps, desc=f"train {config.mode}", unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    if report is None:
        report = bar.write if progress else (lambda line: None)

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        clock = time.perf_counter()
        total, tokens = dev_log_likelihood(trained, dev, data, 2 * config.batch_size,
                                           config.device)
        ppl = math.exp(min(-total / max(tokens, 1), 709.0))
        improved = ppl < best["ppl"]
        if improved:  # the step is read from the log record that follows this call
            best.update(ppl=ppl, state=copy.deepcopy(trained.state_dict()))
        best["seconds"] += time.perf_counter() - clock
        return {"ppl": ppl, "improved": float(improved)}

    def log(record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        else:
            curve.append({"step": record["step"], "ppl": record["ppl"]})
            if record["improved"]:
                best["step"] = record["step"]
            report(f"  dev step {record['step']:>6}: ppl {record['ppl']:.3f}"
                   + ("  (best so far)" if record["improved"] else ""))

    trainer = Trainer(
        model, lambda params: torch.optim.Adam(params, lr=config.lr), batches,
        max_steps=config.steps, checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.checkpoint_every if checkpoint_dir else None,
        resume=resume, overwrite=overwrite, device=config.device, grad_clip=config.grad_clip,
        seed=config.seed,
        progress=False, extra=extra, find_unused_parameters=True, log_fn=log, log_every=10,
        eval_fn=evaluate, eval_every=config.dev_every,
        # Resuming with other settings is refused; run length, evaluation and device may change.
        config={key: value for key, value in asdict(config).items() if key not in _MAY_CHANGE},
        allow_config_change=allow_config_change,
    )
    start = time.perf_counter()
    try:
        summary = trainer.fit()
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    trained = trainer.model
    if best["state"] is not None:
        trained.load_state_dict(best["state"])
    trained.eval()
    steps = max(1, summary.step)
    return trained, TrainResult(seconds, 1000 * (seconds - best["seconds"]) / steps,
                                summary.loss, best["step"], curve, best["seconds"])


def load_model(path: str | Path, device: str = "cpu") -> tuple[Seq2Seq, ExperimentConfig, TaskData]:
    """Rebuild a trained model from a checkpoint written by :func:`train_mode`.

    Raises:
        ValueError: ``path`` is not a checkpoint (for example a ``results.json``).
    """
    path = Path(path)
    if path.is_file() and _starts_like_json(path):
        raise ValueError(f"{path} is a JSON file (results of 'compare'?), not a checkpoint; "
                         "pass OUT/checkpoints/MODE/checkpoint.pt")
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


def _starts_like_json(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(1) in (b"{", b"[")
