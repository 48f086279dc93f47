"""Semirings the dynamic programs of the structured distributions are written against.

A dynamic program written once against ``times`` (combine parts of one structure) and ``sum``
(combine alternative structures) answers several questions, depending on the semiring it runs
in (Goodman 1999, "Semiring parsing"; Li & Eisner 2009, "First- and second-order expectation
semirings"; Eisner 2016, "Inside-outside and forward-backward algorithms are just backprop"):

* :class:`LogSemiring` (``logsumexp``, ``+``): the value is ``log Z``, its gradient the marginals;
* :class:`MaxSemiring` (``max``, ``+``): the value is the best score, its gradient the one-hot
  best structure;
* :class:`SamplingSemiring`: the value is ``log Z``, its gradient one exact sample (the backward
  pass of each ``sum`` draws one summand, i.e. forward filtering, backward sampling);
* :class:`EntropySemiring`: the value is ``(log Z, H)``, the Shannon entropy of the Gibbs
  distribution, in one forward pass.

Semiring elements are tensors of log-space scores with ``element_dims`` extra leading dims
(none for log, max and sampling; one of size 2 for entropy). ``lift`` turns log-potentials into
elements; every operation works on the trailing dims, so a program indexes with negative dims.
Semirings are used as classes (never instantiated): ``LogSemiring.sum(x, -1)``.
"""

from __future__ import annotations

import abc

import torch

#: log p at or below this is treated as p = 0 in the entropy semiring; above any log of a
#: representable positive float64 (-745), so it never changes a real term
_LOG_PROB_FLOOR = -1.0e4


class Semiring(abc.ABC):
    """A commutative semiring on log-space score tensors (used as a class, not an instance)."""

    name: str = ""
    #: leading dims every element carries (e.g. value and entropy of the entropy semiring)
    element_dims: int = 0

    @classmethod
    def lift(cls, log_potentials: torch.Tensor) -> torch.Tensor:
        """The element of each log-potential (one structure part with that score)."""
        return log_potentials

    @classmethod
    def one(cls, like: torch.Tensor) -> torch.Tensor:
        """The multiplicative identity shaped like the element tensor ``like``."""
        return torch.zeros_like(like)

    @classmethod
    def zero(cls, like: torch.Tensor) -> torch.Tensor:
        """The additive identity (no structure) shaped like the element tensor ``like``."""
        return torch.full_like(like, float("-inf"))

    @classmethod
    def times(cls, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Combine parts of one structure (broadcasting): log scores add."""
        return left + right

    @classmethod
    def normalize(cls, message: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(message - shift, shift)``: a message ``(*element, B, C)`` shifted to a maximum of 0.

        The shift ``(B,)`` is a constant (no gradient), so a program that adds it back with
        ``rescale`` has the same value and the same gradients, while float32 keeps the
        precision of one step instead of the whole prefix.
        """
        shift = message.detach().amax(-1)
        # a message that rules out every state (all -inf) stays so, instead of -inf - -inf = NaN
        shift = torch.where(shift > -torch.inf, shift, 0.0)
        return message - shift.unsqueeze(-1), shift

    @classmethod
    def rescale(cls, value: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """Undo ``normalize``: multiply ``value`` ``(*element, B)`` by ``exp(log_scale)``."""
        return value + log_scale

    @classmethod
    @abc.abstractmethod
    def sum(cls, elements: torch.Tensor, dim: int) -> torch.Tensor:
        """Combine alternative structures along ``dim`` (a negative dim of the element part)."""

    @classmethod
    def dot(cls, left: torch.Tensor, right: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``sum(times(left, right), dim)``."""
        return cls.sum(cls.times(left, right), dim)

    @classmethod
    def matmul(cls, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Semiring matrix product ``out[..., i, k] = sum_j left[..., i, j] (x) right[..., j, k]``.

        Memory ``(..., I, J, K)``: meant for few states. The reduction runs over the last
        dim (contiguous), about twice as fast on CPU as a middle one.
        """
        return cls.dot(left.unsqueeze(-2), right.transpose(-1, -2).unsqueeze(-3), -1)

    @classmethod
    def matvec(cls, matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``out[..., i] = sum_j matrix[..., i, j] (x) vector[..., j]``."""
        return cls.dot(matrix, vector.unsqueeze(-2), -1)


class LogSemiring(Semiring):
    """Sum-product in log space: ``sum`` is ``logsumexp``; the gradient of a value is marginals."""

    name = "log"

    @classmethod
    def sum(cls, elements: torch.Tensor, dim: int) -> torch.Tensor:
        # one shift per output entry: exact at any scale
        return torch.logsumexp(elements, dim)


class MaxSemiring(Semiring):
    """Max-product in log space: ``sum`` is ``max``; the gradient is the one-hot best structure.

    ``Tensor.max(dim)`` sends the whole gradient to one index on ties (``amax`` would split it),
    so the gradient of a max-semiring program is always a single structure.
    """

    name = "max"

    @classmethod
    def sum(cls, elements: torch.Tensor, dim: int) -> torch.Tensor:
        return elements.max(dim).values


class _SampledLogSumExp(torch.autograd.Function):
    """``logsumexp`` whose backward sends each output's gradient to one summand, drawn with
    probability ``softmax`` of the summands (exact ancestral sampling when run backward)."""

    @staticmethod
    def forward(ctx, elements, dim):  # type: ignore[override]
        value = torch.logsumexp(elements, dim)
        ctx.save_for_backward(elements, value)
        ctx.dim = dim
        return value

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        elements, value = ctx.saved_tensors
        dim = ctx.dim
        logits = (elements - value.unsqueeze(dim)).movedim(dim, -1)
        drawn = sample_categorical(logits)
        one_hot = torch.nn.functional.one_hot(drawn, logits.shape[-1]).to(elements.dtype)
        return one_hot.movedim(-1, dim) * grad_output.unsqueeze(dim), None


class SamplingSemiring(LogSemiring):
    """The log semiring with a sampling backward: the gradient of ``log Z`` is one exact sample.

    Run backward from a single output, each ``sum`` receives a one-hot gradient and passes it
    to one summand drawn from its posterior share, which is forward filtering, backward
    sampling (torch-struct's ``SampledSemiring`` works the same way).
    """

    name = "sample"

    @classmethod
    def sum(cls, elements: torch.Tensor, dim: int) -> torch.Tensor:
        return _SampledLogSumExp.apply(elements, dim)


class EntropySemiring(Semiring):
    """Pairs ``(log w, h)``: log total weight and Shannon entropy of the normalized weights.

    ``times`` of independent parts adds both; ``sum`` over alternatives with shares
    ``p_i = softmax(log w)_i`` gives ``h = sum_i p_i (h_i - log p_i)`` (the chain rule of
    entropy). Tracking ``h`` itself, rather than an expected score subtracted from ``log Z`` at
    the end, keeps float32 accurate when scores are large (no cancellation).
    Elements carry one leading dim of size 2: ``[log w, h]``.
    """

    name = "entropy"
    element_dims = 1

    @classmethod
    def lift(cls, log_potentials: torch.Tensor) -> torch.Tensor:
        return torch.stack([log_potentials, torch.zeros_like(log_potentials)])

    @classmethod
    def zero(cls, like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full_like(like[0], float("-inf")), torch.zeros_like(like[1])])

    @classmethod
    def normalize(cls, message: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # only the log weight moves; the entropy of the normalized weights does not change
        shift = message[0].detach().amax(-1)
        return torch.stack([message[0] - shift.unsqueeze(-1), message[1]]), shift

    @classmethod
    def rescale(cls, value: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        return torch.stack([value[0] + log_scale, value[1]])

    @classmethod
    def sum(cls, elements: torch.Tensor, dim: int) -> torch.Tensor:
        log_weight, entropy = elements[0], elements[1]
        log_share = torch.log_softmax(log_weight, dim).clamp(min=_LOG_PROB_FLOOR)
        share = log_share.exp()
        total = torch.logsumexp(log_weight, dim)
        return torch.stack([total, (share * (entropy - log_share)).sum(dim)])


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from unnormalized ``logits: (..., K)``; returns ``(...,)`` int64.

    Uses the Gumbel-max trick, which needs no normalization and is exact.
    """
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits + gumbel).argmax(-1)
