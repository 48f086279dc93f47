"""Linear-chain CRF over label sequences, and the segmentation attention of Kim et al. (2017).

One dynamic program, :func:`chain_program`, written once against a semiring
(:mod:`structattn.distributions.semiring`), answers every question: ``log Z`` (log semiring),
the best sequence (gradient of the max semiring), exact samples (gradient of the sampling
semiring) and the entropy (entropy semiring). *How* its recursion runs (sequential, blocked
scan, probability space) is chosen by :mod:`structattn._backend`, not here.

The marginals, the training path of structured attention, are an autograd function of their
own (:class:`_ChainMarginals`): one forward-backward (the two recursions share one scan on a
doubled batch) in the forward pass, every marginal normalized locally, and in the backward
pass the exact Hessian-vector product of ``log Z`` (a covariance, computed from the
marginals by two linear recursions of conditional probabilities), with no graph of the
recursion kept. Its backward is itself differentiable, so higher derivatives stay exact.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from structattn import _backend

from .semiring import EntropySemiring, LogSemiring, MaxSemiring, SamplingSemiring
from .structured import (
    StructuredDistribution,
    check_lengths,
    check_potentials,
    resolve_validation,
)


# ------------------------------------------------------------------------ the one program
def chain_program(
    semiring: type, potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The chain's value in ``semiring``: ``(*element, B)``.

    ``potentials: (B, E, C, C)`` ``[b, n, c_next, c_prev]`` log-potentials, ``initial: (B, C)``
    scores of the first label, ``lengths: (B,)`` in ``[1, E+1]``. The log semiring gives
    ``log Z``, the max semiring the best score, the entropy semiring ``[log Z, H]``.
    """
    matrices = semiring.lift(potentials)
    start = semiring.lift(initial)
    messages, log_scale = _backend.chain_scan(semiring, matrices, start)
    last = (lengths - 1).view(-1, 1)
    index = last.unsqueeze(-1).expand(messages.shape[:-2] + (1, messages.shape[-1]))
    final = messages.gather(-2, index).squeeze(-2)
    return semiring.rescale(semiring.sum(final, -1), log_scale.gather(-1, last).squeeze(-1))


def _program_gradient(
    semiring: type, potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d value / d (potentials, initial)`` of ``chain_program`` on private copies, no graph.

    In the max and sampling semirings this is the one-hot parts of one sequence.
    """
    with torch.inference_mode(False), torch.enable_grad():
        phi = potentials.detach().clone().requires_grad_(True)
        theta = initial.detach().clone().requires_grad_(True)
        value = chain_program(semiring, phi, theta, lengths)
        edges, first = torch.autograd.grad(
            value.sum(), (phi, theta), allow_unused=True, materialize_grads=True
        )
    return edges.detach(), first.detach()


def _parts_to_labels(edges: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Labels ``(B, N)`` of one-hot edge parts ``(B, N-1, C, C)`` and first-node parts ``(B, C)``.

    Positions past a sequence's end have no part and read as label 0.
    """
    return torch.cat([first.argmax(-1, keepdim=True), edges.sum(-1).argmax(-1)], -1)


# ----------------------------------------------------------------------------- marginals
def _masks(lengths: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(node mask (B, N), edge mask (B, N-1, 1, 1))``: True inside each sequence."""
    node_mask = torch.arange(num_nodes, device=lengths.device) < lengths.unsqueeze(-1)
    return node_mask, node_mask[:, 1:, None, None]


def _forward_backward(
    potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor, all_nodes: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(edge marginals (B, E, C, C), node marginals (B, E+1, C), log Z (B,))``, no graph.

    With ``all_nodes=False`` only the first node's marginals are computed, ``(B, 1, C)``.

    Potentials past each length are set to zero for the recursions, which only adds the same
    constant to every entry of a message: locally normalized marginals are then exact with no
    per-sequence boundary handling. The backward recursion is the forward one on the reversed,
    transposed matrices, so both run in one scan on a doubled batch. Every marginal is a
    softmax over its own position (or edge), not ``exp(. - log Z)``: messages are known only up
    to a per-position constant, and float32 keeps its precision at scale 100 and length 1024.
    """
    batch, num_steps, num_states = potentials.shape[:3]
    node_mask, edge_mask = _masks(lengths, num_steps + 1)
    stacked = potentials.new_empty((2 * batch,) + potentials.shape[1:])
    torch.mul(potentials, edge_mask, out=stacked[:batch])
    stacked[batch:] = stacked[:batch].flip(1).transpose(-1, -2)
    starts = torch.cat([initial, torch.zeros_like(initial)], 0)
    messages, log_scale = _backend.chain_scan(LogSemiring, stacked, starts)
    del stacked
    alpha, beta = messages[:batch], messages[batch:].flip(1)
    # the forward messages are exact up to each sequence's end (the padding comes after it)
    last = (lengths - 1).view(-1, 1)
    final = alpha.gather(1, last.unsqueeze(-1).expand(-1, 1, num_states)).squeeze(1)
    log_partition = torch.logsumexp(final, -1) + log_scale[:batch].gather(1, last).squeeze(1)
    if all_nodes:
        nodes = torch.softmax(alpha + beta, -1) * node_mask.unsqueeze(-1)
    else:
        nodes = torch.softmax(alpha[:, :1] + beta[:, :1], -1)
    edges = potentials + beta[:, 1:].unsqueeze(-1)
    edges.add_(alpha[:, :-1].unsqueeze(-2))
    flat = edges.view(batch, num_steps, num_states * num_states)
    flat.sub_(flat.amax(-1, keepdim=True)).exp_()
    flat.div_(flat.sum(-1, keepdim=True))
    if bool((lengths <= num_steps).any()):
        edges.mul_(edge_mask)
    return edges, nodes, log_partition


def _safe_denominator(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with zeros replaced by ones, for dividing marginals by marginals.

    An edge marginal is at most its node marginal, so the quotient is a probability; where the
    node marginal is 0 so is the numerator (and the state is never conditioned on). Division,
    not a reciprocal: ``1 / p`` overflows float32 for subnormal ``p``.
    """
    return torch.where(tensor > 0, tensor, 1.0)


def _hessian_vector_product(
    edges: torch.Tensor,
    nodes: torch.Tensor,
    lengths: torch.Tensor,
    grad_edges: torch.Tensor,
    grad_nodes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H v`` for the Hessian ``H`` of ``log Z`` in (edge potentials, initial potentials).

    The marginals are ``d log Z / d phi``, so the backward pass of a loss through them is
    ``H v`` with ``v`` the loss's gradient with respect to the marginals; ``H`` is the
    covariance of the parts: ``(H v)_e = mu_e (E[g | e] - E[g])`` with ``g(z) = <v,
    parts(z)>``. A node gradient is folded into the edge entering the node (the first node's
    into the initial potentials), and ``v`` is centered at every position (a constant per
    position changes no covariance), so ``E[g]`` is 0 and nothing grows with the length. In a
    chain, ``E[g | z_n = j, z_{n+1} = i] = A_n[j] + v_n[i, j] + B_{n+1}[i]`` with ``A`` (``B``)
    the expected ``g`` before (after) the edge given its end state, two affine recursions
    whose matrices are conditional probabilities read off the marginals
    (``p(z_n = j | z_{n+1} = i) = mu_n[i, j] / nu_{n+1}[i]``).
    """
    batch, num_steps, num_states = edges.shape[:3]
    node_mask, edge_mask = _masks(lengths, num_steps + 1)
    grad_nodes = grad_nodes * node_mask.unsqueeze(-1)
    # potentials-sized temporaries are released as soon as they are used: peak memory is
    # part of the benchmark's target
    direction = torch.where(edge_mask, grad_edges + grad_nodes[:, 1:].unsqueeze(-1), 0.0)
    direction = direction - (edges * direction).sum((-1, -2), keepdim=True)
    first = grad_nodes[:, 0]
    first = first - (nodes[:, 0] * first).sum(-1, keepdim=True)
    denominator = _safe_denominator(nodes)
    weighted = edges * direction
    # forward: A_{n+1} = P_n A_n + r_n with P_n[i, j] = p(z_n = j | z_{n+1} = i);
    # backward: B_n = Q_n B_{n+1} + s_n with Q_n[j, i] = p(z_{n+1} = i | z_n = j), reversed
    offsets = torch.cat(
        [weighted.sum(-1) / denominator[:, 1:], (weighted.sum(-2) / denominator[:, :-1]).flip(1)]
    )
    del weighted
    matrices = torch.cat(
        [
            edges / denominator[:, 1:].unsqueeze(-1),
            (edges / denominator[:, :-1].unsqueeze(-2)).transpose(-1, -2).flip(1),
        ]
    )
    expectations = _backend.affine_scan(
        matrices, offsets, torch.cat([first, torch.zeros_like(first)])
    )
    del matrices
    before, after = expectations[:batch], expectations[batch:].flip(1)
    # past a sequence's end the edge marginals are 0, so the conditional there is never used
    conditional = direction + before[:, :-1].unsqueeze(-2)
    del direction
    conditional = conditional + after[:, 1:].unsqueeze(-1)
    mean = (edges * conditional).sum((-1, -2), keepdim=True)
    grad_potentials = edges * (conditional - mean)
    first_conditional = before[:, 0] + after[:, 0]
    first_mean = (nodes[:, 0] * first_conditional).sum(-1, keepdim=True)
    return grad_potentials, nodes[:, 0] * (first_conditional - first_mean)


class _ChainMarginals(torch.autograd.Function):
    """``(edge marginals, node marginals)`` with the Hessian-vector product as backward."""

    @staticmethod
    def forward(ctx, potentials, initial, lengths):  # type: ignore[override]
        edges, nodes, _ = _forward_backward(potentials, initial, lengths)
        ctx.save_for_backward(edges, nodes, lengths)
        return edges, nodes

    @staticmethod
    def backward(ctx, grad_edges, grad_nodes):  # type: ignore[override]
        edges, nodes, lengths = ctx.saved_tensors
        if grad_edges is None:
            grad_edges = torch.zeros_like(edges)
        if grad_nodes is None:
            grad_nodes = torch.zeros_like(nodes)
        grad_potentials, grad_initial = _hessian_vector_product(
            edges, nodes, lengths, grad_edges, grad_nodes
        )
        return grad_potentials, grad_initial, None


def chain_marginals(
    potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge marginals (B, E, C, C), node marginals (B, E+1, C))``; differentiable."""
    return _ChainMarginals.apply(potentials, initial, lengths)


class _ChainLogPartition(torch.autograd.Function):
    """``log Z``, its gradient the marginals (``chain_marginals``).

    When a gradient will be asked for, the forward pass runs the forward-backward scan (the
    two recursions on a doubled batch cost about one recursion where per-step overhead
    dominates) and keeps the marginals; otherwise only the log-semiring program runs. When
    the backward pass itself records (``create_graph=True``) it goes through
    ``chain_marginals``, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, potentials, initial, lengths):  # type: ignore[override]
        ctx.save_for_backward(potentials, initial, lengths)
        ctx.marginals = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            edges, nodes, log_partition = _forward_backward(
                potentials, initial, lengths, all_nodes=False
            )
            ctx.marginals = (edges, nodes[:, 0])
            return log_partition
        return chain_program(LogSemiring, potentials, initial, lengths)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        potentials, initial, lengths = ctx.saved_tensors
        if torch.is_grad_enabled() or ctx.marginals is None:
            edges, nodes = chain_marginals(potentials, initial, lengths)
            first = nodes[:, 0]
        else:
            edges, first = ctx.marginals
        ctx.marginals = None
        return grad_output.view(-1, 1, 1, 1) * edges, grad_output.view(-1, 1) * first, None


class LinearChainCRF(StructuredDistribution):
    r"""Linear-chain conditional random field over label sequences ``z_0 .. z_{N-1}``.

    .. math::
        p(z) = \frac{1}{Z} \exp\Big(\theta_{z_0} + \sum_{n=0}^{L-2} \phi_{n, z_{n+1}, z_n}\Big)

    with ``L`` the sequence's length. The convention follows torch-struct so its users can
    switch: ``log_potentials[..., n, c_next, c_prev]`` scores the edge from position ``n`` in
    state ``c_prev`` to position ``n + 1`` in state ``c_next``.

    A value (sample, argmax) is a label sequence, ``batch_shape + (N,)`` int64, with zeros past
    each length; ``log_prob`` also accepts torch-struct's one-hot edge parts.

    Args:
        log_potentials: ``(*batch, N-1, C, C)`` edge scores.
        lengths: ``(*batch,)`` integer sequence lengths in ``[1, N]`` (default ``N``).
        initial_potentials: ``(*batch, C)`` scores of the first label (default zeros; an
            extension of torch-struct, which has no unary on ``z_0``).

    Reference: Lafferty et al. 2001; as attention, Kim et al. 2017, "Structured Attention
    Networks".
    """

    arg_constraints = {
        "log_potentials": constraints.real,
        "initial_potentials": constraints.real,
    }
    potential_event_dims = 3
    _batched_attributes = ("potentials", "lengths", "initial_potentials")

    @classmethod
    def infer_shapes(cls, log_potentials, **kwargs):
        """``(batch_shape, event_shape)`` for potentials ``(..., N-1, C, C)``."""
        shape = torch.Size(log_potentials)
        return shape[:-3], torch.Size((shape[-3] + 1,))

    def __init__(
        self,
        log_potentials: torch.Tensor,
        lengths: torch.Tensor | None = None,
        initial_potentials: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = resolve_validation(validate_args)
        check_potentials(log_potentials, "log_potentials", 3, validate)
        *batch, num_edges, num_next, num_prev = log_potentials.shape
        if num_next != num_prev:
            raise ValueError(
                "log_potentials must have shape (*batch, N-1, C, C) with two equal state "
                f"dims, got {tuple(log_potentials.shape)}"
            )
        if num_prev == 0:
            raise ValueError("log_potentials has zero states (C = 0)")
        batch_shape = torch.Size(batch)
        if initial_potentials is None:
            initial_potentials = log_potentials.new_zeros(()).expand(batch_shape + (num_prev,))
        else:
            check_potentials(initial_potentials, "initial_potentials", 1, validate)
            if initial_potentials.shape[-1] != num_prev:
                raise ValueError(
                    f"initial_potentials must end in C={num_prev} states, got shape "
                    f"{tuple(initial_potentials.shape)}"
                )
            initial_potentials = initial_potentials.expand(batch_shape + (num_prev,))
        self.initial_potentials = initial_potentials
        self.num_states = num_prev
        lengths = check_lengths(
            lengths, batch_shape, num_edges + 1, validate, device=log_potentials.device
        )
        super().__init__(
            log_potentials, lengths, torch.Size((num_edges + 1,)), validate_args=validate_args
        )

    @property
    def log_potentials(self) -> torch.Tensor:
        """The edge scores ``(*batch, N-1, C, C)``."""
        return self.potentials

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)

    # ------------------------------------------------------------------ flat dynamic programs
    def _initial_flat(self, potentials: torch.Tensor) -> torch.Tensor:
        return self.initial_potentials.to(potentials.dtype).reshape(-1, self.num_states)

    def _log_partition_flat(self, potentials, lengths):
        return _ChainLogPartition.apply(potentials, self._initial_flat(potentials), lengths)

    def _marginals_flat(self, potentials, lengths):
        return chain_marginals(potentials, self._initial_flat(potentials), lengths)[0]

    def _argmax_flat(self, potentials, lengths):
        parts = _program_gradient(MaxSemiring, potentials, self._initial_flat(potentials), lengths)
        return _parts_to_labels(*parts)

    def _sample_flat(self, potentials, lengths, num_samples):
        batch = potentials.shape[0]
        initial = self._initial_flat(potentials)

        def repeat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.expand((num_samples,) + tensor.shape).reshape((-1,) + tensor.shape[1:])

        parts = _program_gradient(
            SamplingSemiring, repeat(potentials), repeat(initial), repeat(lengths)
        )
        labels = _parts_to_labels(*parts)
        return labels.view(num_samples, batch, potentials.shape[1] + 1)

    def _entropy_flat(self, potentials, lengths):
        initial = self._initial_flat(potentials)
        return chain_program(EntropySemiring, potentials, initial, lengths)[1]

    def _score_flat(self, value, potentials, lengths):
        initial = self._initial_flat(potentials)
        num_samples, batch, num_nodes = value.shape
        num_states = self.num_states
        start = initial.unsqueeze(0).expand(num_samples, -1, -1).gather(-1, value[..., :1])
        if num_nodes == 1:
            return start.squeeze(-1)
        flat_edges = potentials.reshape(batch, num_nodes - 1, num_states * num_states)
        index = value[..., 1:] * num_states + value[..., :-1]
        edge_scores = flat_edges.unsqueeze(0).expand(num_samples, -1, -1, -1)
        edge_scores = edge_scores.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        positions = torch.arange(num_nodes - 1, device=value.device)
        edge_scores = edge_scores * (positions < (lengths - 1).unsqueeze(-1))
        return start.squeeze(-1) + edge_scores.sum(-1)

    def _parts_to_value(self, parts):
        # a sequence of length one has no edge, so its parts cannot tell its label: it reads as 0
        if parts.shape[-3:] != self.potentials.shape[-3:]:
            raise ValueError(
                f"parts must end in {tuple(self.potentials.shape[-3:])}, got shape "
                f"{tuple(parts.shape)}"
            )
        first = parts[..., :1, :, :].sum(-2).argmax(-1)
        rest = parts.sum(-1).argmax(-1)
        return torch.cat([first, rest], -1)

    # -------------------------------------------------------------------------- public extras
    @property
    def node_marginals(self) -> torch.Tensor:
        """``p(z_n = c)``, shape ``(*batch, N, C)``; zero past each length."""
        potentials, lengths = self._flat()
        nodes = chain_marginals(potentials, self._initial_flat(potentials), lengths)[1]
        return self._unflatten(nodes).to(self._result_dtype())

    @property
    def attention(self) -> torch.Tensor:
        """Soft weights ``(*batch, N, C)``: the node marginals (each position is a query over
        the ``C`` labels, or over source positions for :class:`MonotonicAlignment`)."""
        return self.node_marginals

    def expected_score(self, other: StructuredDistribution) -> torch.Tensor:
        potentials, lengths = self._flat()
        edges, nodes = chain_marginals(potentials, self._initial_flat(potentials), lengths)
        other_edges, _ = other._flat()
        other_initial = other._initial_flat(other_edges)
        value = (edges * other_edges).sum((-1, -2, -3)) + (nodes[:, 0] * other_initial).sum(-1)
        return self._unflatten(value).to(self._result_dtype())

    def to_parts(self, value: torch.Tensor) -> torch.Tensor:
        """One-hot edge parts ``(..., N-1, C, C)`` (torch-struct's form) of label sequences.

        Edges past each length are zero.
        """
        num_states = self.num_states
        nxt = torch.nn.functional.one_hot(value[..., 1:], num_states).unsqueeze(-1)
        prev = torch.nn.functional.one_hot(value[..., :-1], num_states).unsqueeze(-2)
        parts = (nxt * prev).to(self.potentials.dtype)
        positions = torch.arange(value.shape[-1] - 1, device=value.device)
        mask = positions < (self.lengths - 1).unsqueeze(-1)
        return parts * mask[..., None, None]


class AlignmentChain(LinearChainCRF):
    """A chain over the source positions that target steps ``0 .. T-1`` read (the monotonic
    and HMM alignments): its emissions make it the posterior ``p(z | x, y)``, and its
    ``log_partition`` is ``log p(y | x)``."""

    @property
    def log_marginal_likelihood(self) -> torch.Tensor:
        """``log p(y | x)`` with the alignment summed out, shape ``batch_shape``."""
        return self.log_partition

    @property
    def target_lengths(self) -> torch.Tensor:
        """``(*batch,)`` target lengths (the chain's ``lengths``)."""
        return self.lengths


def segmentation_crf(
    scores: torch.Tensor,
    transition: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    validate_args: bool | None = None,
) -> LinearChainCRF:
    """The segmentation attention of Kim et al. (2017, section 3.2) as a two-state chain.

    Every source position ``s`` carries a binary state: 1 when it is attended to. Its unary
    score is ``scores[..., s]`` for state 1 and 0 for state 0; ``transition[c_next, c_prev]``
    scores neighbouring states. The attention weights are ``crf.node_marginals[..., 1]``, the
    posterior probability that each position is selected (they need not sum to one).

    Args:
        scores: ``(*batch, S)`` unary scores of selecting each source position.
        transition: ``(2, 2)`` or ``(*batch, S-1, 2, 2)`` pairwise scores (default zeros).
        lengths: ``(*batch,)`` source lengths in ``[1, S]``.

    Returns:
        A ``LinearChainCRF`` with ``log_potentials: (*batch, S-1, 2, 2)``.
    """
    validate = resolve_validation(validate_args)
    check_potentials(scores, "scores", 1, validate)
    if scores.shape[-1] == 0:
        raise ValueError("scores has an empty last dimension: there is nothing to attend to")
    unary = torch.stack([torch.zeros_like(scores), scores], -1)
    num_edges = scores.shape[-1] - 1
    if transition is None:
        transition = scores.new_zeros(2, 2)
    else:
        check_potentials(transition, "transition", 2, validate)
        if transition.shape[-2:] != (2, 2):
            raise ValueError(f"transition must end in (2, 2), got {tuple(transition.shape)}")
    edges = unary[..., 1:, :].unsqueeze(-1) + transition
    edges = edges.expand(scores.shape[:-1] + (num_edges, 2, 2))
    return LinearChainCRF(
        edges, lengths=lengths, initial_potentials=unary[..., 0, :], validate_args=validate_args
    )
