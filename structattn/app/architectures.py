"""Model architectures the seq2seq tasks can train, by name (``--arch``).

An architecture builds a model for a run's settings, lists the attention modes it offers, and
reports what is worth reading about a trained model beyond its metrics (attention sparsity,
learned alphas). Register another one from any code with :func:`register_architecture`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from structattn._registry import class_decorator

if TYPE_CHECKING:
    from torch import nn

    from structattn.app.config import RunSettings, TaskData

__all__ = ["ARCHITECTURES", "Architecture", "get_architecture", "register_architecture"]


class Architecture(abc.ABC):
    """How a run's settings become a model."""

    #: one line for ``--help``
    description: str = ""

    @abc.abstractmethod
    def modes(self) -> tuple[str, ...]:
        """Attention modes the architecture offers."""

    @abc.abstractmethod
    def default_modes(self) -> tuple[str, ...]:
        """The modes ``compare`` runs when ``--modes`` is not given."""

    @abc.abstractmethod
    def build(self, config: RunSettings, data: TaskData) -> nn.Module:
        """A fresh model for ``config.mode`` (the caller seeds torch)."""

    def diagnostics(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """Facts about a trained model on one batch, for the results (default: none)."""
        return {}

    #: run options this architecture's models do not read (the comparison says so)
    unread_options: tuple[str, ...] = ()

    def ignored_options(self, config: RunSettings) -> tuple[str, ...]:
        """The options in :attr:`unread_options` that ``config`` sets away from their
        defaults: settings the run would otherwise silently drop."""
        from dataclasses import fields

        defaults = {field.name: field.default for field in fields(config)}
        return tuple(name for name in self.unread_options
                     if getattr(config, name) != defaults[name])


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str) -> Callable[[type[Architecture]], type[Architecture]]:
    """Class decorator: add an :class:`Architecture` under ``name``."""
    return class_decorator(ARCHITECTURES, name, Architecture, instantiate=True)


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``; a ``ValueError`` lists the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


@register_architecture("rnn")
class RNNArchitecture(Architecture):
    """Bi-LSTM encoder, LSTM decoder without input feeding (:class:`structattn.models.Seq2Seq`)."""

    description = "bi-LSTM encoder, LSTM decoder without input feeding"

    def modes(self) -> tuple[str, ...]:
        from structattn.models.seq2seq import MODES

        return tuple(MODES)

    def default_modes(self) -> tuple[str, ...]:
        return ("soft", "marginal", "variational-enum", "hard-score")

    def build(self, config, data):
        from structattn.models.seq2seq import Seq2Seq

        vocab = data.target_vocab
        return Seq2Seq(
            len(data.source_vocab), len(vocab), mode=config.mode, embed_dim=config.embed_dim,
            hidden=config.hidden, dropout=config.dropout, num_samples=config.num_samples,
            temperature=config.temperature, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
            eos_id=vocab.eos_id, lexical_emission=config.lexical_emission,
            contextual_emission=config.contextual_emission,
            stateful_emission=config.stateful_emission,
            batch_vocabulary=config.batch_vocabulary,
        )


@register_architecture("transformer")
class TransformerArchitecture(Architecture):
    """Pre-norm Transformer whose last cross-attention is the latent alignment
    (:class:`structattn.models.TransformerSeq2Seq`); ``--hidden`` is ``d_model``."""

    description = ("pre-norm Transformer (d_model = --hidden, 4 heads, 2 encoder and 2 decoder "
                   "layers) whose last cross-attention is the latent alignment")
    # its output layer is its own: the RNN's emission options do not apply
    unread_options = ("lexical_emission", "contextual_emission", "stateful_emission",
                      "batch_vocabulary")

    def modes(self) -> tuple[str, ...]:
        from structattn.models.transformer import TRANSFORMER_MODES

        return tuple(TRANSFORMER_MODES)

    def default_modes(self) -> tuple[str, ...]:
        return ("soft", "sparsemax", "entmax-learned", "marginal")

    def build(self, config, data):
        from structattn.models.transformer import TransformerSeq2Seq

        vocab = data.target_vocab
        return TransformerSeq2Seq(
            len(data.source_vocab), len(vocab), mode=config.mode, d_model=config.hidden,
            num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=2 * config.hidden, dropout=config.dropout,
            num_samples=config.num_samples, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
            eos_id=vocab.eos_id,
        )

    def diagnostics(self, model, batch):
        import torch

        with torch.no_grad():
            return {"attention_sparsity": model.attention_sparsity(batch),
                    "alphas": model.alphas()}
