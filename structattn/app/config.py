"""What one seq2seq run is given: its settings and its data, as plain data.

Tasks (:mod:`structattn.app.tasks`) read the settings to load their data and architectures
(:mod:`structattn.app.architectures`) to build a model, so this room sits below both and imports
neither.  :class:`RunSettings` checks each field on its own;
:class:`structattn.app.experiment.ExperimentConfig`, the class users construct, adds the checks
against the task and architecture registries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from structattn.data.vocab import Vocab

__all__ = ["RunSettings", "TaskData"]

_Settings = TypeVar("_Settings", bound="RunSettings")
#: settings that must be positive ints, and those that may also be None
_POSITIVE = ("steps", "batch_size", "beam_size", "hidden", "embed_dim", "dev_every", "vocab_size")
_POSITIVE_OR_NONE = ("eval_size", "dev_size", "max_train", "max_length", "checkpoint_every",
                     "target_vocab_size")


@dataclass
class RunSettings:
    """Everything that defines a run (stored in checkpoints and results, so plain data only).

    ``eval_size=None`` evaluates the whole test split; ``dev_size=None`` the whole dev split;
    ``target_vocab_size=None`` uses ``vocab_size`` on both sides.
    """

    task: str = "g2p"
    mode: str = "soft"
    arch: str = "rnn"
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
    eval_size: int | None = None
    dev_size: int | None = 1000
    dev_every: int = 250
    beam_size: int = 5
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int | None = None
    vocab_size: int = 8000
    target_vocab_size: int | None = None
    lexical_emission: bool = False
    contextual_emission: bool = True
    stateful_emission: bool = True
    batch_vocabulary: bool = False

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in _POSITIVE_OR_NONE:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.hidden % 2:
            raise ValueError(f"hidden must be even (bidirectional encoder), got {self.hidden}")

    @classmethod
    def from_options(cls: type[_Settings], options: dict[str, Any]) -> _Settings:
        """Settings from resolved options, ignoring keys that are not fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in options.items() if key in names})

    def replace(self: _Settings, **changes: Any) -> _Settings:
        """A copy with ``changes`` applied (checked again)."""
        return type(self)(**{**asdict(self), **changes})


@dataclass
class TaskData:
    """A task's splits, vocabularies and sizes (``sizes``: examples per split)."""

    name: str
    train: Sequence[Any]
    dev: Sequence[Any]
    test: Sequence[Any]
    source_vocab: Vocab
    target_vocab: Vocab
    sizes: dict[str, int] = field(default_factory=dict)
