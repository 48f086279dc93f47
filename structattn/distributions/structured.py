"""The surface every structured alignment distribution shares.

A structured distribution is a Gibbs distribution ``p(z) = exp(<phi, parts(z)>) / Z`` over
combinatorial structures ``z`` (label sequences, trees, monotone paths) whose score is linear in
a tensor of log-potentials ``phi``.  Everything generic follows from three facts:

* ``log Z`` comes from a dynamic program (or a determinant) written by each subclass;
* the marginals ``mu = E[parts(z)]`` are the gradient of ``log Z`` with respect to ``phi``;
* ``log p(z) = <phi, parts(z)> - log Z``, hence ``H(p) = log Z - <mu, phi>`` and
  ``KL(p || q) = <mu_p, phi_p - phi_q> - log Z_p + log Z_q``.

Subclasses implement the dynamic programs on flattened batches (one leading batch dimension);
this base class owns batch shapes, ``lengths``, validation, ``expand`` and the generic
quantities, so that every structure is a Pyro distribution usable in ``pyro.sample``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions import TorchDistribution
from torch.distributions.kl import register_kl

from structattn._backend import computation_dtype
from structattn._validation import (
    check_broadcasts_to,
    check_finite,
    refuse_jit_tracing,
    validation_enabled,
)


def check_potentials(potentials: torch.Tensor, name: str, event_dims: int, validate: bool) -> None:
    """Check that ``potentials`` is a floating tensor with ``event_dims`` trailing dims."""
    if not isinstance(potentials, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(potentials).__name__}")
    if not potentials.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {potentials.dtype}")
    if potentials.dim() < event_dims:
        raise ValueError(
            f"{name} must have at least {event_dims} dimensions, got shape "
            f"{tuple(potentials.shape)}"
        )
    if validate:
        check_finite(potentials, name)


def check_lengths(
    lengths: torch.Tensor | None,
    batch_shape: torch.Size,
    max_length: int,
    validate: bool,
    name: str = "lengths",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Return ``lengths`` as an int64 tensor of ``batch_shape`` (default: all ``max_length``).

    Raises ``ValueError`` when ``lengths`` is not an integer tensor, does not broadcast to
    ``batch_shape``, or (while validating) holds a value outside ``[1, max_length]``.
    """
    if lengths is None:
        return torch.full(batch_shape, max_length, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")
    check_broadcasts_to(lengths.shape, batch_shape, name, "the batch shape")
    if validate and lengths.numel() > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > max_length:
            raise ValueError(
                f"{name} must lie in [1, {max_length}] (the size of the potentials), "
                f"got values in [{low}, {high}]"
            )
    return lengths.to(dtype=torch.long, device=device).expand(batch_shape)


def gradient_of_log_partition(
    log_partition: Callable[[torch.Tensor], torch.Tensor], potentials: torch.Tensor
) -> torch.Tensor:
    """``d log Z / d potentials`` for a log-partition program ``log_partition: (B, ...) -> (B,)``.

    When autograd is recording and ``potentials`` requires grad, the result is differentiable
    (``create_graph``), so a loss on the marginals trains the potentials. Otherwise the program
    runs on a private copy, also under ``torch.no_grad`` and ``torch.inference_mode``, and the
    result carries no graph. The caller's tensor is never touched.
    """
    if torch.is_grad_enabled() and potentials.requires_grad:
        value = log_partition(potentials)
        (grad,) = torch.autograd.grad(value.sum(), potentials, create_graph=True)
        return grad
    with torch.inference_mode(False), torch.enable_grad():
        copy = potentials.detach().clone().requires_grad_(True)
        value = log_partition(copy)
        (grad,) = torch.autograd.grad(value.sum(), copy)
    return grad.detach()


class StructuredDistribution(TorchDistribution):
    """Base class of the structured alignment distributions (a Pyro ``TorchDistribution``).

    Subclasses set ``potential_event_dims`` (trailing dims of ``potentials`` that belong to one
    structure) and implement the flat-batch hooks ``_log_partition_flat``, ``_argmax_flat``,
    ``_sample_flat`` and ``_score_flat`` (``_marginals_flat`` and ``_entropy_flat`` have
    generic defaults). The hooks see one contiguous leading batch dim, possibly of size 0;
    this class broadcasts values against the batch shape as ``Categorical`` does.

    Attributes:
        potentials: the caller's log-potentials, ``batch_shape + potential event shape``.
        lengths: int64 ``batch_shape``, the size of each structure (padding is ignored).
    """

    has_rsample = False
    has_enumerate_support = False
    potential_event_dims: int = 0
    #: attributes with leading batch dims that ``expand`` broadcasts
    _batched_attributes: tuple[str, ...] = ("potentials", "lengths")

    def __new__(cls, *args: Any, **kwargs: Any) -> StructuredDistribution:
        # (Every way of making one passes here: constructors, expand, unpickling.)
        refuse_jit_tracing(cls.__name__)
        return super().__new__(cls)

    def __init__(
        self,
        potentials: torch.Tensor,
        lengths: torch.Tensor,
        event_shape: torch.Size,
        validate_args: bool | None = None,
    ) -> None:
        self.potentials = potentials
        self.lengths = lengths
        batch_shape = potentials.shape[: potentials.dim() - self.potential_event_dims]
        # subclasses already checked every argument (finite, shapes, lengths), a stricter test
        # than torch's constraint check, which would only repeat it
        super().__init__(batch_shape, event_shape, validate_args=False)
        self._validate_args = resolve_validation(validate_args)

    # ----------------------------------------------------------------- hooks for subclasses
    @abc.abstractmethod
    def _log_partition_flat(self, potentials: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log Z of flat ``potentials: (B, ...)`` in the computation dtype; returns ``(B,)``."""

    def _marginals_flat(self, potentials: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Marginals ``(B, ...)`` shaped like the flat potentials."""
        return gradient_of_log_partition(
            lambda phi: self._log_partition_flat(phi, lengths), potentials
        )

    @abc.abstractmethod
    def _argmax_flat(self, potentials: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Highest-scoring structures ``(B, *event_shape)``."""

    @abc.abstractmethod
    def _sample_flat(
        self, potentials: torch.Tensor, lengths: torch.Tensor, num_samples: int
    ) -> torch.Tensor:
        """Exact samples ``(num_samples, B, *event_shape)``."""

    @abc.abstractmethod
    def _score_flat(
        self, value: torch.Tensor, potentials: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Unnormalized log score of ``value: (K, B, *event_shape)``; returns ``(K, B)``."""

    def _entropy_flat(self, potentials: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Entropy ``(B,)``: ``log Z - <mu, phi>`` unless a subclass has a direct program."""
        dims = tuple(range(-self.potential_event_dims, 0))
        marginals = self._marginals_flat(potentials, lengths)
        return self._log_partition_flat(potentials, lengths) - (marginals * potentials).sum(dims)

    def _parts_to_value(self, parts: torch.Tensor) -> torch.Tensor:
        """Convert a one-hot parts tensor (torch-struct's format) to a compact value."""
        raise ValueError(f"{type(self).__name__} takes integer-valued structures only")

    # ------------------------------------------------------------------------- helpers
    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous potentials ``(B, ...)`` in the computation dtype and lengths ``(B,)``.

        Any layout of the caller's tensor (transposed, expanded, sliced) is accepted; ``B`` may
        be 0 (every method then returns an empty result).
        """
        event = self.potentials.shape[self.potentials.dim() - self.potential_event_dims :]
        dtype = computation_dtype(self.potentials.dtype)
        batch = self.batch_shape.numel()
        potentials = self.potentials.to(dtype).reshape((batch,) + tuple(event)).contiguous()
        return potentials, self.lengths.reshape(batch).contiguous()

    def _unflatten(self, tensor: torch.Tensor, leading: tuple[int, ...] = ()) -> torch.Tensor:
        """Reshape ``(*leading, B, ...)`` (flat batch) to ``(*leading, *batch_shape, ...)``."""
        rest = tensor.shape[len(leading) + 1 :]
        return tensor.reshape(tuple(leading) + tuple(self.batch_shape) + tuple(rest))

    def _result_dtype(self) -> torch.dtype:
        return self.potentials.dtype

    # ------------------------------------------------------------------- public surface
    @property
    def log_partition(self) -> torch.Tensor:
        """log Z, shape ``batch_shape`` (differentiable; its gradient is the marginals)."""
        potentials, lengths = self._flat()
        value = self._log_partition_flat(potentials, lengths)
        return self._unflatten(value).to(self._result_dtype())

    @property
    def partition(self) -> torch.Tensor:
        """log Z, shape ``batch_shape`` (torch-struct's name for ``log_partition``)."""
        return self.log_partition

    @property
    def marginals(self) -> torch.Tensor:
        """Marginal probability of every part, shaped like ``potentials``.

        Differentiable when autograd records and the potentials require grad; otherwise
        computed without building a graph (also under ``torch.inference_mode``).
        """
        potentials, lengths = self._flat()
        return self._unflatten(self._marginals_flat(potentials, lengths)).to(self._result_dtype())

    @property
    def argmax(self) -> torch.Tensor:
        """The highest-scoring structure, ``batch_shape + event_shape`` (int64)."""
        potentials, lengths = self._flat()
        with torch.no_grad():
            return self._unflatten(self._argmax_flat(potentials.detach(), lengths))

    @property
    def mode(self) -> torch.Tensor:
        """Alias of ``argmax``."""
        return self.argmax

    @property
    def max(self) -> torch.Tensor:
        """The highest structure score ``max_z score(z)``, shape ``batch_shape`` (torch-struct's
        ``max``; differentiable, its gradient is the argmax's parts)."""
        return self.score(self.argmax)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Exact samples, ``sample_shape + batch_shape + event_shape`` (int64)."""
        sample_shape = torch.Size(sample_shape)
        num_samples = sample_shape.numel()
        if num_samples == 0:
            return self.potentials.new_zeros(
                sample_shape + self.batch_shape + self.event_shape, dtype=torch.long
            )
        potentials, lengths = self._flat()
        with torch.no_grad():
            draws = self._sample_flat(potentials.detach(), lengths, num_samples)
        return self._unflatten(draws, (num_samples,)).reshape(
            sample_shape + self.batch_shape + self.event_shape
        )

    def score(self, value: torch.Tensor) -> torch.Tensor:
        """Unnormalized log score ``<phi, parts(value)>``, shape ``sample_shape + batch_shape``.

        ``value`` is ``sample_shape + batch_shape + event_shape`` (compact integer form) or a
        floating one-hot parts tensor shaped like ``potentials`` (torch-struct's form).
        """
        if value.is_floating_point():
            value = self._parts_to_value(value)
        event_dims = len(self.event_shape)
        value_batch = value.shape[: value.dim() - event_dims]
        if value.shape[value.dim() - event_dims :] != self.event_shape:
            raise ValueError(
                f"value has event shape {tuple(value.shape[value.dim() - event_dims :])}, "
                f"expected {tuple(self.event_shape)}"
            )
        try:
            full = torch.broadcast_shapes(value_batch, self.batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast to batch shape "
                f"{tuple(self.batch_shape)}"
            ) from err
        leading = full[: len(full) - len(self.batch_shape)]
        batch_shape = full[len(leading) :]
        if batch_shape != self.batch_shape:
            # the value enlarges size-1 batch dims: score against the broadcast distribution,
            # as torch's Categorical does (views only)
            return self.expand(batch_shape).score(value)
        value = value.expand(full + self.event_shape).reshape(
            (leading.numel(), self.batch_shape.numel()) + tuple(self.event_shape)
        )
        potentials, lengths = self._flat()
        scores = self._score_flat(value.long(), potentials, lengths)
        return scores.reshape(leading + self.batch_shape).to(self._result_dtype())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(value)``, shape ``sample_shape + batch_shape`` (see ``score`` for ``value``)."""
        # torch's support check cannot reshape an empty value; an empty value has nothing to check
        if self._validate_args and not value.is_floating_point() and value.numel() > 0:
            self._validate_sample(value)
        return self.score(value) - self.log_partition

    def expected_score(self, other: StructuredDistribution) -> torch.Tensor:
        """``E_self[<phi_other, parts(z)>]``, shape ``batch_shape``."""
        dims = tuple(range(-self.potential_event_dims, 0))
        return (self.marginals * other.potentials).sum(dims)

    def entropy(self) -> torch.Tensor:
        """Shannon entropy, shape ``batch_shape`` (differentiable)."""
        potentials, lengths = self._flat()
        return self._unflatten(self._entropy_flat(potentials, lengths)).to(self._result_dtype())

    def cross_entropy(self, other: StructuredDistribution) -> torch.Tensor:
        """``-E_self[log other(z)]`` for a distribution of the same type, shapes and lengths,
        shape ``batch_shape`` (differentiable in both)."""
        self._check_comparable(other)
        return other.log_partition - self.expected_score(other)

    def kl_divergence(self, other: StructuredDistribution) -> torch.Tensor:
        """``KL(self || other)`` for a distribution of the same type, shapes and lengths."""
        self._check_comparable(other)
        return self.cross_entropy(other) - self.cross_entropy(self)

    def _check_comparable(self, other: StructuredDistribution) -> None:
        if type(other) is not type(self):
            raise ValueError(f"other must be a {type(self).__name__}, got {type(other).__name__}")
        if other.potentials.shape != self.potentials.shape:
            raise ValueError(
                f"other has potentials of shape {tuple(other.potentials.shape)}, expected "
                f"{tuple(self.potentials.shape)}"
            )
        if not torch.equal(other.lengths, self.lengths):
            raise ValueError("other must have the same lengths as self")

    def expand(self, batch_shape: torch.Size, _instance=None) -> StructuredDistribution:
        """Broadcast to ``batch_shape`` (views only; nothing is recomputed or copied)."""
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        old = len(self.batch_shape)
        new.__dict__.update(self.__dict__)
        for name in self._batched_attributes:
            tensor = getattr(self, name)
            setattr(new, name, tensor.expand(batch_shape + tensor.shape[old:]))
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


@register_kl(StructuredDistribution, StructuredDistribution)
def _kl_structured(p: StructuredDistribution, q: StructuredDistribution) -> torch.Tensor:
    return p.kl_divergence(q)


def resolve_validation(validate_args: bool | None) -> bool:
    """Whether a constructor validates: ``validate_args`` if given, else the global switch."""
    return validation_enabled() if validate_args is None else bool(validate_args)
