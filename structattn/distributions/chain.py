"""Linear-chain CRF over label sequences, and the segmentation attention of Kim et al. (2017).

How the marginals are computed (CPU, chosen per call; numbers in ``benchmarks/structured.py``):

* **Space.** When no potential matrix spreads more than 60 nats (float32; 600 in float64),
  messages live in probability space: each matrix is exponentiated once after subtracting its
  maximum and a step is a BLAS product plus a rescaling. This is exact, not a heuristic: every
  message entry then stays within exp(-60)/C of its maximum, so nothing underflows (the failure
  of exp-matmul-log with row and column shifts, as in Pyro's ``DiscreteHMM``, is an entry that
  underflows although the other direction would have made it large). Otherwise messages live
  in log space, one ``logsumexp`` with its own shift per output entry, exact at any scale.
* **Depth.** With few states (up to four in probability space, two in log space) and 24+ steps,
  a blocked scan: the N-1 steps are cut into ~sqrt(N) blocks whose prefix products are built
  together, then chained, for depth ~2 sqrt(N) and C-fold arithmetic; a sequential step is then
  nothing but per-operation overhead. With more states the sequential loop, O(N C^2) work.
  A log-depth scan of semiring matrix products (torch-struct) costs O(N C^3) work and memory
  per level; on CPU it loses to both, by 30-50x at 32 states.

The forward and backward recursions share one loop (the batch doubled), every marginal is
normalized locally rather than by a global log Z, and memory stays at one potentials-sized
buffer. When autograd records (training through the marginals) sequential log-space
recursions run with differentiable operations instead.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from .semiring import LogSemiring, sample_categorical
from .structured import (
    StructuredDistribution,
    check_lengths,
    check_potentials,
    resolve_validation,
)


def _chain_forward(
    semiring: type, potentials: torch.Tensor, initial: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Forward messages ``alpha: (B, N, C)`` for ``potentials: (N-1, B, C, C)`` (time-major).

    ``alpha[:, n, c]`` is the semiring sum of the scores of all prefixes ending in state ``c``
    at position ``n``; ``initial: (B, C)`` scores the first label. With ``normalize`` every
    message is shifted to a maximum of zero, which keeps float32 rounding at the scale of one
    step instead of the whole prefix (messages are then right up to a per-position constant).
    """
    alpha = initial
    alphas = [alpha]
    for step in potentials:
        alpha = semiring.sum(step + alpha.unsqueeze(-2), -1)
        if normalize:
            alpha = alpha - alpha.amax(-1, keepdim=True)
        alphas.append(alpha)
    return torch.stack(alphas, 1)


def _chain_backward(potentials: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Backward messages ``beta: (B, N, C)``, each shifted to a maximum of zero.

    ``beta[:, n] = 0`` from the last real position on.
    """
    num_edges, batch, num_states = potentials.shape[:3]
    beta = potentials.new_zeros(batch, num_states)
    betas = [beta]
    for n in range(num_edges - 1, -1, -1):
        step = torch.logsumexp(potentials[n] + beta.unsqueeze(-1), -2)
        step = step - step.amax(-1, keepdim=True)
        beta = torch.where((lengths - 1 <= n).unsqueeze(-1), 0.0, step)
        betas.append(beta)
    betas.reverse()
    return torch.stack(betas, 1)


def _final(tensor: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``tensor[b, lengths[b] - 1]`` for ``tensor: (B, N, ...)``."""
    index = (lengths - 1).view(-1, *([1] * (tensor.dim() - 1)))
    index = index.expand(-1, 1, *tensor.shape[2:])
    return tensor.gather(1, index).squeeze(1)


def _matvec(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(B, C, C) @ (B, C) -> (B, C)``; above 16 states a broadcast multiply-sum beats CPU bmm."""
    if matrices.shape[-1] <= 16:
        return torch.bmm(matrices, vectors.unsqueeze(-1)).squeeze(-1)
    return (matrices * vectors.unsqueeze(-2)).sum(-1)


def _chain_log_partition(
    potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """log Z ``(B,)`` by the forward recursion alone (no graph; see ``_ChainLogPartition``).

    In probability space when that is exact (``_probability_space_is_exact``), keeping the log
    of every rescaling; otherwise in log space.
    """
    if potentials.shape[1] and _probability_space_is_exact(potentials, initial):
        shift = potentials.amax((-1, -2), keepdim=True)
        start_shift = initial.amax(-1, keepdim=True)
        vector = torch.exp(initial - start_shift)
        vectors, scales = [vector], [start_shift.squeeze(-1)]
        for n in range(potentials.shape[1]):
            # exponentiated step by step: a potentials-sized temporary costs more than the loop
            vector = _matvec(torch.exp(potentials[:, n] - shift[:, n]), vector)
            top = vector.amax(-1, keepdim=True)
            vector = vector / top
            vectors.append(vector)
            scales.append(top.squeeze(-1).log() + shift[:, n, 0, 0])
        log_scale = torch.stack(scales, 1).cumsum(1)
        final = (lengths - 1).unsqueeze(-1)
        last = _final(torch.stack(vectors, 1), lengths)
        return last.sum(-1).log() + log_scale.gather(1, final).squeeze(-1)
    alpha = _chain_forward(LogSemiring, potentials.transpose(0, 1), initial)
    return torch.logsumexp(_final(alpha, lengths), -1)


def _log_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Log-semiring product ``out[..., i, k] = logsumexp_j left[..., i, j] + right[..., j, k]``.

    Each output entry gets its own shift (exact at any scale); memory ``(..., I, J, K)``, so
    only for few states.
    """
    # reduce over the last dim: a contiguous reduction is about twice as fast on CPU
    return torch.logsumexp(left.unsqueeze(-2) + right.transpose(-1, -2).unsqueeze(-3), -1)


def _blocked_scan(matrices: torch.Tensor, start: torch.Tensor, block: int) -> torch.Tensor:
    """All prefix messages ``out[:, n+1] = matrices[:, n] (x) out[:, n]`` in the log semiring.

    Messages (and the block prefix products) are shifted to a maximum of zero, so they are
    right up to a per-position constant.

    ``matrices: (B, E, C, C)``, ``start: (B, C)``; returns ``(B, E+1, C)``. Two-level scan: the
    ``E`` steps are cut into ``K`` blocks of ``block`` steps; prefix products inside all blocks
    are built at once (``block`` sequential steps of ``K`` small matrix products), the block
    boundaries are chained (``K`` steps), and every message is read off in one batched product.
    Depth ``block + K`` ~ ``2 sqrt(E)`` instead of ``E``, for ``C`` times more work: the right
    trade for few states, where a sequential step is all overhead and no arithmetic.
    """
    batch, num_steps, num_states = matrices.shape[:3]
    num_blocks = -(-num_steps // block)
    padding = num_blocks * block - num_steps
    if padding:
        filler = matrices.new_zeros(batch, padding, num_states, num_states)
        matrices = torch.cat([matrices, filler], 1)
    blocks = matrices.view(batch, num_blocks, block, num_states, num_states)
    prefix = blocks[:, :, 0]
    prefixes = [prefix]
    for j in range(1, block):
        prefix = _log_matmul(blocks[:, :, j], prefix)
        prefix = prefix - prefix.amax((-1, -2), keepdim=True)
        prefixes.append(prefix)
    within = torch.stack(prefixes, 2)
    boundary = start
    boundaries = [boundary]
    for k in range(num_blocks - 1):
        boundary = torch.logsumexp(within[:, k, -1] + boundary.unsqueeze(-2), -1)
        boundary = boundary - boundary.amax(-1, keepdim=True)
        boundaries.append(boundary)
    entry = torch.stack(boundaries, 1)[:, :, None, None, :]
    messages = torch.logsumexp(within + entry, -1).reshape(batch, num_blocks * block, num_states)
    messages = messages - messages.amax(-1, keepdim=True)
    return torch.cat([start.unsqueeze(1), messages[:, :num_steps]], 1)


#: largest spread (max - min) of one potential matrix for which probability-space messages are
#: exact: every message entry then stays above exp(-spread) / C of its maximum, far from
#: underflow, and the terms that do underflow are below 1e-12 of their sum
_PROBABILITY_SPREAD = {torch.float32: 60.0, torch.float64: 600.0}


def _use_blocked_scan(num_steps: int, num_states: int, probability_space: bool) -> bool:
    """Blocked scan or sequential loop (measured on CPU, ``benchmarks/structured.py``).

    With few states a sequential step is nothing but per-operation overhead and the C-fold
    extra arithmetic of the scan is cheap: the probability-space scan wins up to four states
    (2.4x at two states, 1.2x at four, N = 2048), the log-space one only at two states.
    """
    return num_steps >= 24 and num_states <= (4 if probability_space else 2)


def _blocked_probability_scan(
    weights: torch.Tensor, start: torch.Tensor, block: int
) -> torch.Tensor:
    """``_blocked_scan`` in probability space: BLAS products and no transcendental per step.

    ``weights: (B, E, C, C)`` (each matrix exponentiated after subtracting its maximum),
    ``start: (B, C)`` log start messages; returns log messages ``(B, E+1, C)``, each right up
    to a per-position constant. Every column of a block prefix product is rescaled to a
    maximum of one and its log scale kept; under the spread condition of
    ``_PROBABILITY_SPREAD`` every entry of a column then stays within exp(-spread) / C of the
    column's maximum, so nothing that matters underflows.
    """
    batch, num_steps, num_states = weights.shape[:3]
    num_blocks = -(-num_steps // block)
    padding = num_blocks * block - num_steps
    if padding:
        # identity steps at the very end leave every real prefix unchanged
        eye = torch.eye(num_states, dtype=weights.dtype, device=weights.device)
        weights = torch.cat([weights, eye.expand(batch, padding, num_states, num_states)], 1)
    blocks = weights.view(batch, num_blocks, block, num_states, num_states)
    prefix = blocks[:, :, 0]
    scale = prefix.amax(-2, keepdim=True)
    prefix = prefix / scale
    log_scale = scale.log()
    prefixes, log_scales = [prefix], [log_scale]
    for j in range(1, block):
        prefix = torch.matmul(blocks[:, :, j], prefix)
        scale = prefix.amax(-2, keepdim=True)
        prefix = prefix / scale
        log_scale = log_scale + scale.log()
        prefixes.append(prefix)
        log_scales.append(log_scale)
    within = torch.stack(prefixes, 2)
    within_log = torch.stack(log_scales, 2).squeeze(-2)
    boundary = start
    boundaries = [boundary]
    for k in range(num_blocks - 1):
        log_weights = within_log[:, k, -1] + boundary
        vector = torch.exp(log_weights - log_weights.amax(-1, keepdim=True))
        boundary = _matvec(within[:, k, -1], vector).log()
        boundaries.append(boundary)
    log_weights = within_log + torch.stack(boundaries, 1).unsqueeze(2)
    vectors = torch.exp(log_weights - log_weights.amax(-1, keepdim=True))
    messages = (within * vectors.unsqueeze(-2)).sum(-1).log()
    messages = messages.reshape(batch, num_blocks * block, num_states)
    return torch.cat([start.unsqueeze(1), messages[:, :num_steps]], 1)


def _paired_step(matrices: torch.Tensor, n: int) -> torch.Tensor:
    """Step ``n`` of the forward recursion stacked on step ``n`` of the reversed backward one.

    ``matrices: (B, E, C, C)`` -> ``(2B, C, C)``: ``matrices[:, n]`` over
    ``matrices[:, E-1-n]`` transposed (the backward messages flow from next to previous state).
    """
    return torch.cat([matrices[:, n], matrices[:, -1 - n].transpose(-1, -2)], 0)


def _paired_log_scan(matrices: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Both recursions in one loop of ``(2B, C, C)`` ``logsumexp`` steps; ``(2B, E+1, C)``."""
    message = starts
    messages = [message]
    for n in range(matrices.shape[1]):
        message = torch.logsumexp(_paired_step(matrices, n) + message.unsqueeze(-2), -1)
        message = message - message.amax(-1, keepdim=True)
        messages.append(message)
    return torch.stack(messages, 1)


def _paired_probability_scan(weights: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Both recursions as matrix-vector products of ``weights = exp(matrices - max)``.

    ``weights: (B, E, C, C)`` (each matrix exponentiated after subtracting its maximum),
    ``starts: (2B, C)`` log start messages; returns log messages ``(2B, E+1, C)``, each right
    up to a per-position constant. A step is one product and one rescaling to a maximum of one,
    against the ``(2B, C, C)`` ``logsumexp`` of ``_paired_log_scan``. Exact only when every
    matrix spreads less than ``_PROBABILITY_SPREAD`` (checked by the caller).
    """
    vector = torch.exp(starts - starts.amax(-1, keepdim=True))
    vectors = [vector]
    for n in range(weights.shape[1]):
        vector = _matvec(_paired_step(weights, n), vector)
        vector = vector / vector.amax(-1, keepdim=True)
        vectors.append(vector)
    return torch.log(torch.stack(vectors, 1))


def _probability_space_is_exact(matrices: torch.Tensor, initial: torch.Tensor) -> bool:
    """Whether every matrix of ``(B, E, C, C)`` and the start scores spread less than the limit."""
    limit = _PROBABILITY_SPREAD.get(matrices.dtype, 0.0)
    spread = (matrices.amax((-1, -2)) - matrices.amin((-1, -2))).amax()
    start_spread = (initial.amax(-1) - initial.amin(-1)).amax()
    return bool(spread < limit) and bool(start_spread < limit)


def _fast_marginals(
    potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chain_marginals`` without autograd, in one potentials-sized buffer.

    Potentials past each length are set to zero for the recursions, which only adds the same
    constant to every entry of a message: the locally normalized marginals are then exact with
    no per-sequence boundary handling. The forward and the (reversed) backward recursion share
    one loop, so the loop has N-1 steps on a doubled batch. The buffer first holds the padded
    potentials (or their exponentials), then becomes the edge marginals in place: on CPU a fresh
    potentials-sized tensor costs as much as the whole recursion.
    """
    batch, num_steps, num_states = potentials.shape[:3]
    positions = torch.arange(num_steps + 1, device=lengths.device)
    node_mask = positions < lengths.unsqueeze(-1)
    edge_mask = node_mask[:, 1:, None, None]
    buffer = potentials * edge_mask  # also the one potentials-sized allocation
    starts = torch.cat([initial, torch.zeros_like(initial)], 0)
    if num_steps == 0:
        messages = starts.unsqueeze(1)
    elif _probability_space_is_exact(buffer, initial):
        buffer.sub_(buffer.amax((-1, -2), keepdim=True)).exp_()
        if _use_blocked_scan(num_steps, num_states, probability_space=True):
            reverse = buffer.flip(1).transpose(-1, -2)
            messages = _blocked_probability_scan(
                torch.cat([buffer, reverse], 0), starts, max(1, round(num_steps**0.5))
            )
        else:
            messages = _paired_probability_scan(buffer, starts)
    elif _use_blocked_scan(num_steps, num_states, probability_space=False):
        reverse = buffer.flip(1).transpose(-1, -2)
        messages = _blocked_scan(
            torch.cat([buffer, reverse], 0), starts, max(1, round(num_steps**0.5))
        )
    else:
        messages = _paired_log_scan(buffer, starts)
    alpha, beta = messages[:batch], messages[batch:].flip(1)
    nodes = torch.softmax(alpha + beta, -1) * node_mask.unsqueeze(-1)
    edges = torch.add(potentials, beta[:, 1:].unsqueeze(-1), out=buffer)
    edges.add_(alpha[:, :-1].unsqueeze(-2))
    flat = edges.view(batch, num_steps, num_states * num_states)
    flat.sub_(flat.amax(-1, keepdim=True)).exp_()
    flat.div_(flat.sum(-1, keepdim=True))
    if bool((lengths <= num_steps).any()):
        edges.mul_(edge_mask)
    return edges, nodes


def _chain_marginals(
    potentials: torch.Tensor, initial: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-backward: ``(edge marginals (B, N-1, C, C), node marginals (B, N, C))``.

    Every marginal is normalized locally (a softmax over the states of its own position or
    edge) rather than by subtracting a global ``log Z``: messages are only known up to a
    per-position constant, and float32 keeps its precision at scale 100 and length 1024.
    When autograd records and the potentials require grad, only differentiable operations are
    used, so a loss on the marginals trains the potentials (second order); otherwise
    ``_fast_marginals`` runs and no graph is built.
    """
    recording = torch.is_grad_enabled() and (potentials.requires_grad or initial.requires_grad)
    if not recording:
        return _fast_marginals(potentials, initial, lengths)
    batch, num_edges, num_states = potentials.shape[:3]
    positions = torch.arange(num_edges + 1, device=lengths.device)
    node_mask = positions < lengths.unsqueeze(-1)
    time_major = potentials.transpose(0, 1).contiguous()
    alpha = _chain_forward(LogSemiring, time_major, initial, normalize=True)
    beta = _chain_backward(time_major, lengths)
    nodes = torch.softmax(alpha + beta, -1) * node_mask.unsqueeze(-1)
    joint = alpha[:, :-1].unsqueeze(-2) + potentials + beta[:, 1:].unsqueeze(-1)
    edges = torch.softmax(joint.reshape(batch, num_edges, num_states * num_states), -1)
    edges = edges.reshape(joint.shape) * node_mask[:, 1:, None, None]
    return edges, nodes


class _ChainLogPartition(torch.autograd.Function):
    """log Z with a forward-backward gradient (the edge and first-node marginals).

    The forward pass runs without recording; the backward pass computes the marginals with
    differentiable operations, so ``create_graph=True`` gives exact second derivatives.
    """

    @staticmethod
    def forward(ctx, potentials, initial, lengths):  # type: ignore[override]
        ctx.save_for_backward(potentials, initial, lengths)
        return _chain_log_partition(potentials, initial, lengths)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        potentials, initial, lengths = ctx.saved_tensors
        edges, nodes = _chain_marginals(potentials, initial, lengths)
        return (
            grad_output.view(-1, 1, 1, 1) * edges,
            grad_output.view(-1, 1) * nodes[:, 0],
            None,
        )


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
        return _chain_marginals(potentials, self._initial_flat(potentials), lengths)[0]

    def _argmax_flat(self, potentials, lengths):
        time_major = potentials.transpose(0, 1)
        initial = self._initial_flat(potentials)
        batch, num_nodes = initial.shape[0], time_major.shape[0] + 1
        best = initial
        bests, pointers = [best], []
        for step in time_major:
            best, pointer = (step + best.unsqueeze(-2)).max(-1)
            bests.append(best)
            pointers.append(pointer)
        bests_t = torch.stack(bests, 1)
        labels = torch.zeros(batch, num_nodes, dtype=torch.long, device=potentials.device)
        current = torch.zeros(batch, dtype=torch.long, device=potentials.device)
        for n in range(num_nodes - 1, -1, -1):
            start_here = bests_t[:, n].argmax(-1)
            if n < num_nodes - 1:
                followed = pointers[n].gather(-1, current.unsqueeze(-1)).squeeze(-1)
            else:
                followed = start_here
            current = torch.where(
                lengths - 1 == n, start_here, torch.where(n < lengths - 1, followed, 0)
            )
            labels[:, n] = current
        return labels

    def _sample_flat(self, potentials, lengths, num_samples):
        # forward filtering, backward sampling: exact ancestral draws from the chain
        time_major = potentials.transpose(0, 1)
        initial = self._initial_flat(potentials)
        alpha = _chain_forward(LogSemiring, time_major, initial)
        batch, num_nodes, num_states = alpha.shape
        labels = torch.zeros(
            num_samples, batch, num_nodes, dtype=torch.long, device=potentials.device
        )
        current = torch.zeros(num_samples, batch, dtype=torch.long, device=potentials.device)
        for n in range(num_nodes - 1, -1, -1):
            logits = alpha[:, n].expand(num_samples, batch, num_states)
            if n < num_nodes - 1:
                index = current.view(num_samples, batch, 1, 1).expand(-1, -1, 1, num_states)
                rows = time_major[n].expand(num_samples, -1, -1, -1).gather(-2, index)
                interior = (n < lengths - 1).view(1, batch, 1)
                logits = logits + torch.where(interior, rows.squeeze(-2), 0.0)
            drawn = sample_categorical(logits)
            current = torch.where(n <= lengths - 1, drawn, 0)
            labels[..., n] = current
        return labels

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
        nodes = _chain_marginals(potentials, self._initial_flat(potentials), lengths)[1]
        return self._unflatten(nodes).to(self._result_dtype())

    @property
    def attention(self) -> torch.Tensor:
        """Soft weights ``(*batch, N, C)``: the node marginals (each position is a query over
        the ``C`` labels, or over source positions for :class:`MonotonicAlignment`)."""
        return self.node_marginals

    def expected_score(self, other: StructuredDistribution) -> torch.Tensor:
        potentials, lengths = self._flat()
        edges, nodes = _chain_marginals(potentials, self._initial_flat(potentials), lengths)
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
