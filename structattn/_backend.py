"""Kernel selection: *how* a dynamic program runs, chosen in one place outside the distributions.

The distributions state *what* to compute (a chain program over a semiring, a linear recursion);
the kernels here decide how, by speed and exactness, measured on CPU with
``benchmarks/structured.py``:

* **Precision.** ``computation_dtype``: float64 stays float64; float16 and bfloat16 (and
  float32) run in float32, whose range the recursions need.
* **Space.** When no matrix spreads more than ``PROBABILITY_SPREAD`` nats, log-semiring messages
  may live in probability space: each matrix is exponentiated once after subtracting its
  maximum and a step is a BLAS product plus a rescaling. This is exact, not a heuristic: every
  message entry then stays within ``exp(-spread) / C`` of its maximum, so nothing that matters
  underflows (the failure of exp-matmul-log with row and column shifts, as in Pyro's
  ``DiscreteHMM``, is an entry that underflows although the other direction would have made it
  large). Otherwise messages stay in log space, one shift per output entry, exact at any scale.
* **Depth.** With few states and many steps a sequential step is nothing but per-operation
  overhead: a blocked scan cuts the ``E`` steps into ``~sqrt(E)`` blocks whose prefix products
  are built together, then chained, for depth ``~2 sqrt(E)`` and ``C``-fold arithmetic. With
  more states the sequential loop, ``O(E C^2)`` work. (A log-depth scan of matrix products,
  torch-struct's, costs ``O(E C^3)`` work and memory per level; on CPU it loses to both.)

Two kinds of program are served, each by a registry of kernels tried in order (the first that
``applies`` runs; user code can register faster ones, e.g. a CUDA kernel, in front):

* ``chain_scan(semiring, matrices, start)``: all prefix messages of
  ``m[n+1] = matrices[n] (x) m[n]`` in a semiring (:mod:`structattn.distributions.semiring`);
* ``affine_scan(matrices, offsets, start)``: all prefixes of ``x[n+1] = M[n] x[n] + r[n]``
  in ordinary arithmetic (the Hessian-vector products of the chain's marginals).
"""

from __future__ import annotations

import abc

import torch

#: largest spread (max - min) of one log-potential matrix for which probability-space messages
#: are exact: every message entry stays above exp(-spread) / C of its maximum, far from
#: underflow, and the terms that do underflow are below 1e-12 of their sum
PROBABILITY_SPREAD = {torch.float32: 60.0, torch.float64: 600.0}


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a dynamic program runs in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_size(num_steps: int, cost_ratio: float = 1.0) -> int:
    """Steps per block of a blocked scan: ``sqrt(cost_ratio * E)`` balances its two loops.

    ``cost_ratio``: cost of one step chaining the blocks over one step inside the blocks.
    """
    return max(1, round((cost_ratio * num_steps) ** 0.5))


# ------------------------------------------------------------------------------ chain scans
class ChainScanKernel(abc.ABC):
    """One way to run ``m[n+1] = matrices[:, n] (x) m[n]`` in a semiring.

    ``matrices: (*element, B, E, C, C)`` ``[next, previous]`` semiring elements, ``start:
    (*element, B, C)``. ``scan`` returns ``(messages (*element, B, E+1, C), log_scale (B, E+1))``
    with ``semiring.rescale(messages, log_scale)`` the exact messages; the scale lets float32
    keep its precision at the scale of one step rather than the whole prefix. Kernels for the
    log semiring alone run without autograd; the generic sequential kernel records a graph
    (its gradients give argmax and samples).
    """

    name: str = ""

    @abc.abstractmethod
    def applies(self, semiring: type, matrices: torch.Tensor, start: torch.Tensor) -> bool:
        """Whether this kernel can run (exactly) and should, for these inputs."""

    @abc.abstractmethod
    def scan(
        self, semiring: type, matrices: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All prefix messages and their log scales (see the class docstring)."""


CHAIN_SCAN_KERNELS: list[ChainScanKernel] = []


def register_chain_scan_kernel(kernel: ChainScanKernel, first: bool = True) -> ChainScanKernel:
    """Add ``kernel`` to the registry, tried before (``first``) or after the built-ins."""
    if not isinstance(kernel, ChainScanKernel):
        raise ValueError(f"kernel must be a ChainScanKernel, got {type(kernel).__name__}")
    CHAIN_SCAN_KERNELS.insert(0, kernel) if first else CHAIN_SCAN_KERNELS.append(kernel)
    return kernel


def select_chain_scan_kernel(
    semiring: type, matrices: torch.Tensor, start: torch.Tensor
) -> ChainScanKernel:
    """The first registered kernel that applies (the sequential one always does)."""
    for kernel in CHAIN_SCAN_KERNELS:
        if kernel.applies(semiring, matrices, start):
            return kernel
    raise ValueError(f"no chain scan kernel applies to semiring {semiring.__name__}")


def chain_scan(
    semiring: type, matrices: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix messages of a chain program; see :class:`ChainScanKernel` for shapes."""
    return select_chain_scan_kernel(semiring, matrices, start).scan(semiring, matrices, start)


def _is_log_semiring(semiring: type) -> bool:
    # exactly the log semiring: its subclasses (sampling) need their own autograd
    return getattr(semiring, "name", None) == "log"


def _probability_space_is_exact(matrices: torch.Tensor, start: torch.Tensor) -> bool:
    """Whether every matrix of ``(B, E, C, C)`` and every start vector spreads under the limit."""
    limit = PROBABILITY_SPREAD.get(matrices.dtype, 0.0)
    if matrices.numel() == 0 or start.numel() == 0:
        return True
    # the spread of the whole tensor bounds every matrix's: one reduction decides most calls
    low, high = torch.aminmax(matrices)
    start_low, start_high = torch.aminmax(start)
    if bool((high - low < limit) & (start_high - start_low < limit)):
        return True
    spread = (matrices.amax((-1, -2)) - matrices.amin((-1, -2))).amax()
    start_spread = (start.amax(-1) - start.amin(-1)).amax()
    return bool(spread < limit) and bool(start_spread < limit)


def _matvec(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(B, C, C) @ (B, C) -> (B, C)``; above 16 states a broadcast multiply-sum beats CPU bmm."""
    if matrices.shape[-1] <= 16:
        return torch.bmm(matrices, vectors.unsqueeze(-1)).squeeze(-1)
    return (matrices * vectors.unsqueeze(-2)).sum(-1)


class SequentialScan(ChainScanKernel):
    """The chain program as written: one semiring matrix-vector product per step.

    Any semiring, differentiable by autograd. Each message is shifted by the semiring's
    ``normalize`` (a constant without gradient) and the shift kept in the scale.
    """

    name = "sequential"

    def applies(self, semiring, matrices, start):
        return True

    def scan(self, semiring, matrices, start):
        message, shift = semiring.normalize(start)
        messages, shifts = [message], [shift]
        for n in range(matrices.shape[-3]):
            message, shift = semiring.normalize(semiring.matvec(matrices.select(-3, n), message))
            messages.append(message)
            shifts.append(shift)
        return torch.stack(messages, -2), torch.stack(shifts, -1).cumsum(-1)


class ProbabilityScan(ChainScanKernel):
    """Log semiring in probability space: one BLAS matrix-vector product and a rescaling a step."""

    name = "probability"

    def applies(self, semiring, matrices, start):
        return _is_log_semiring(semiring) and _probability_space_is_exact(matrices, start)

    def scan(self, semiring, matrices, start):
        batch, num_steps = matrices.shape[0], matrices.shape[1]
        shift = matrices.amax((-1, -2))
        start_shift = start.amax(-1, keepdim=True)
        vector = torch.exp(start - start_shift)
        vectors, tops = [vector], []
        for n in range(num_steps):
            # exponentiated step by step: a potentials-sized temporary costs more than the loop
            weights = torch.exp(matrices[:, n] - shift[:, n, None, None])
            vector = _matvec(weights, vector)
            top = vector.amax(-1, keepdim=True)
            vector = vector / top
            vectors.append(vector)
            tops.append(top)
        log_scale = start_shift.expand(batch, 1)
        if tops:
            steps = torch.cat(tops, -1).log() + shift
            log_scale = torch.cat([log_scale, steps], 1).cumsum(1)
        return torch.stack(vectors, 1).log(), log_scale


class BlockedProbabilityScan(ChainScanKernel):
    """Two-level (``~sqrt(E)`` blocks) probability-space scan; wins up to four states.

    Every column of a block prefix product is rescaled to a maximum of one and its log scale
    kept; under the spread condition every entry of a column stays within ``exp(-spread) / C``
    of the column's maximum, so nothing that matters underflows. Measured at N = 2048: 2.4x
    the sequential probability scan at two states, 1.2x at four.
    """

    name = "blocked-probability"
    max_states = 4
    min_steps = 24
    #: a step chaining blocks costs about twice a step inside them (measured: 5% faster than 1
    #: at N = 32..512, within noise at 2048)
    cost_ratio = 2.0

    def applies(self, semiring, matrices, start):
        return (
            _is_log_semiring(semiring)
            and matrices.shape[-1] <= self.max_states
            and matrices.shape[-3] >= self.min_steps
            and _probability_space_is_exact(matrices, start)
        )

    def scan(self, semiring, matrices, start):
        batch, num_steps, num_states = matrices.shape[:3]
        block = block_size(num_steps, self.cost_ratio)
        num_blocks = -(-num_steps // block)
        size = num_blocks * block
        # buffers are written in place: on CPU a fresh potentials-sized tensor costs as much as
        # the arithmetic, and peak memory is what the benchmark holds us to
        base = matrices.amax((-1, -2))  # (B, E): the log scale taken out of every matrix
        weights = matrices.new_empty(batch, size, num_states, num_states)
        torch.sub(matrices, base[..., None, None], out=weights[:, :num_steps])
        weights[:, :num_steps].exp_()
        # identity steps at the very end leave every real prefix unchanged
        weights[:, num_steps:].zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0)
        base = torch.cat([base, base.new_zeros(batch, size - num_steps)], 1)
        blocks = weights.view(batch, num_blocks, block, num_states, num_states)
        base_within = base.view(batch, num_blocks, block).cumsum(-1)
        # within[j]: product of the first j+1 matrices of every block, columns scaled to max one
        within = weights.new_empty(block, batch, num_blocks, num_states, num_states)
        within[0] = blocks[:, :, 0]
        scales = []
        for j in range(block):
            if j:
                torch.matmul(blocks[:, :, j], within[j - 1], out=within[j])
            scale = within[j].amax(-2, keepdim=True)
            within[j].div_(scale)
            scales.append(scale)
        del weights, blocks
        # each step's column scale lies in [exp(-spread) / C, C]: its log is taken once, after
        column_log = torch.stack(scales, 2).squeeze(-2).log_().cumsum_(2)  # (B, K, block, C)
        del scales
        # boundary messages stay shifted to a maximum of zero; the shifts add up separately
        start_top = start.amax(-1, keepdim=True)
        boundary = start - start_top
        boundaries, shifts = [boundary], []
        for k in range(num_blocks - 1):
            log_weights = column_log[:, k, -1] + boundary
            top = log_weights.amax(-1, keepdim=True)
            boundary = _matvec(within[-1, :, k], torch.exp(log_weights - top)).log()
            local = boundary.amax(-1, keepdim=True)
            boundary = boundary - local
            boundaries.append(boundary)
            shifts.append(top + local)
        boundary_scales = start_top.expand(batch, num_blocks)
        if shifts:
            steps = torch.cat(shifts, 1) + base_within[:, :-1, -1]
            boundary_scales = torch.cat([start_top, start_top + steps.cumsum(1)], 1)
        # every message: the block prefix applied to the block's entry message, in place
        vectors = column_log.add_(torch.stack(boundaries, 1).unsqueeze(2))
        top = vectors.amax(-1, keepdim=True)
        vectors.sub_(top).exp_()
        vectors = vectors.permute(2, 0, 1, 3).unsqueeze(-1)
        messages = torch.matmul(within, vectors).squeeze(-1).permute(1, 2, 0, 3).log_()
        del within, vectors
        local = messages.amax(-1, keepdim=True)
        messages = messages.sub_(local).reshape(batch, size, num_states)[:, :num_steps]
        scale = (top + local).squeeze(-1).add_(base_within)
        scale = scale.add_(boundary_scales.unsqueeze(-1))
        scale = scale.reshape(batch, size)[:, :num_steps]
        messages = torch.cat([(start - start_top).unsqueeze(1), messages], 1)
        return messages, torch.cat([start_top, scale], 1)


def _shift_of(scores: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """The maximum over ``dims`` (kept) to shift log scores by, 0 where every score is -inf
    (a shift of -inf would turn the ruled-out scores into NaN)."""
    top = scores.amax(dims, keepdim=True)
    return torch.where(top > -torch.inf, top, 0.0)


class BlockedLogScan(ChainScanKernel):
    """Two-level scan in log space (any scale); wins only at two states."""

    name = "blocked-log"
    max_states = 2
    min_steps = 24

    def applies(self, semiring, matrices, start):
        return (
            _is_log_semiring(semiring)
            and matrices.shape[-1] <= self.max_states
            and matrices.shape[-3] >= self.min_steps
        )

    def scan(self, semiring, matrices, start):
        batch, num_steps, num_states = matrices.shape[:3]
        block = block_size(num_steps)
        num_blocks = -(-num_steps // block)
        size = num_blocks * block
        padding = size - num_steps
        if padding:
            eye = torch.full((num_states, num_states), float("-inf"), dtype=matrices.dtype)
            eye = eye.fill_diagonal_(0.0).to(matrices.device)
            filler = eye.expand(batch, padding, num_states, num_states)
            matrices = torch.cat([matrices, filler], 1)
        blocks = matrices.view(batch, num_blocks, block, num_states, num_states)
        prefix = blocks[:, :, 0]
        shift = _shift_of(prefix, (-1, -2))
        prefix = prefix - shift
        prefixes, shifts = [prefix], [shift]
        for j in range(1, block):
            prefix = semiring.matmul(blocks[:, :, j], prefix)
            top = _shift_of(prefix, (-1, -2))
            prefix = prefix - top
            shift = shift + top
            prefixes.append(prefix)
            shifts.append(shift)
        within = torch.stack(prefixes, 2)
        within_shift = torch.stack(shifts, 2).reshape(batch, num_blocks, block)
        # boundary messages stay shifted to a maximum of zero; the shifts add up separately
        boundary_top = _shift_of(start, -1)
        boundary = start - boundary_top
        boundaries, boundary_scales = [boundary], [boundary_top]
        for k in range(num_blocks - 1):
            boundary = semiring.matvec(within[:, k, -1], boundary)
            local = _shift_of(boundary, -1)
            boundary = boundary - local
            boundary_top = boundary_top + local + within_shift[:, k, -1, None]
            boundaries.append(boundary)
            boundary_scales.append(boundary_top)
        entry = torch.stack(boundaries, 1)[:, :, None, None, :]
        messages = semiring.sum(within + entry, -1)
        local = _shift_of(messages, -1)
        messages = (messages - local).reshape(batch, size, num_states)[:, :num_steps]
        scale = local.squeeze(-1) + within_shift + torch.cat(boundary_scales, 1).unsqueeze(-1)
        scale = scale.reshape(batch, size)[:, :num_steps]
        start_top = _shift_of(start, -1)
        messages = torch.cat([(start - start_top).unsqueeze(1), messages], 1)
        return messages, torch.cat([start_top, scale], 1)


# ----------------------------------------------------------------------------- affine scans
class AffineScanKernel(abc.ABC):
    """One way to run ``x[n+1] = matrices[:, n] @ x[n] + offsets[:, n]`` in plain arithmetic.

    ``matrices: (B, E, C, C)``, ``offsets: (B, E, C)``, ``start: (B, C)``; returns
    ``(B, E+1, C)``. Used with row-stochastic matrices, so nothing grows geometrically.
    """

    name: str = ""

    @abc.abstractmethod
    def applies(self, matrices: torch.Tensor) -> bool:
        """Whether this kernel should run for these inputs."""

    @abc.abstractmethod
    def scan(
        self, matrices: torch.Tensor, offsets: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """All prefixes ``(B, E+1, C)``."""


AFFINE_SCAN_KERNELS: list[AffineScanKernel] = []


def register_affine_scan_kernel(kernel: AffineScanKernel, first: bool = True) -> AffineScanKernel:
    """Add ``kernel`` to the registry, tried before (``first``) or after the built-ins."""
    if not isinstance(kernel, AffineScanKernel):
        raise ValueError(f"kernel must be an AffineScanKernel, got {type(kernel).__name__}")
    AFFINE_SCAN_KERNELS.insert(0, kernel) if first else AFFINE_SCAN_KERNELS.append(kernel)
    return kernel


def affine_scan(matrices: torch.Tensor, offsets: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """All prefixes of an affine recursion; see :class:`AffineScanKernel` for shapes."""
    for kernel in AFFINE_SCAN_KERNELS:
        if kernel.applies(matrices):
            return kernel.scan(matrices, offsets, start)
    raise ValueError("no affine scan kernel applies")


class SequentialAffineScan(AffineScanKernel):
    """One matrix-vector product per step."""

    name = "sequential"

    def applies(self, matrices):
        return True

    def scan(self, matrices, offsets, start):
        vector = start
        vectors = [vector]
        for n in range(matrices.shape[1]):
            vector = _matvec(matrices[:, n], vector) + offsets[:, n]
            vectors.append(vector)
        return torch.stack(vectors, 1)


class BlockedAffineScan(AffineScanKernel):
    """Two-level scan of the augmented ``(C+1, C+1)`` matrices ``[[M, r], [0, 1]]``."""

    name = "blocked"
    max_states = 4
    min_steps = 24

    def applies(self, matrices):
        return matrices.shape[-1] <= self.max_states and matrices.shape[1] >= self.min_steps

    def scan(self, matrices, offsets, start):
        batch, num_steps, num_states = matrices.shape[:3]
        block = block_size(num_steps)
        num_blocks = -(-num_steps // block)
        size = num_blocks * block
        augmented = matrices.new_zeros(batch, size, num_states + 1, num_states + 1)
        augmented[:, :num_steps, :num_states, :num_states] = matrices
        augmented[:, :num_steps, :num_states, num_states] = offsets
        # identity steps at the very end leave every real prefix unchanged
        augmented[:, num_steps:].diagonal(dim1=-2, dim2=-1).fill_(1.0)
        augmented[:, :num_steps, num_states, num_states] = 1.0
        blocks = augmented.view(batch, num_blocks, block, num_states + 1, num_states + 1)
        prefix = blocks[:, :, 0]
        prefixes = [prefix]
        for j in range(1, block):
            prefix = torch.matmul(blocks[:, :, j], prefix)
            prefixes.append(prefix)
        within = torch.stack(prefixes, 2)  # (B, K, block, C+1, C+1)
        boundary = torch.cat([start, start.new_ones(batch, 1)], -1)
        boundaries = [boundary]
        for k in range(num_blocks - 1):
            boundary = _matvec(within[:, k, -1], boundary)
            boundaries.append(boundary)
        entry = torch.stack(boundaries, 1)  # (B, K, C+1)
        out = torch.matmul(within, entry[:, :, None, :, None]).squeeze(-1)
        out = out.reshape(batch, size, num_states + 1)[:, :num_steps, :num_states]
        return torch.cat([start.unsqueeze(1), out], 1)


# tried in reverse order of registration: probability space first when exact, blocked first
# when short of states, the sequential program last (it always applies)
for _kernel in (
    SequentialScan(),
    BlockedLogScan(),
    ProbabilityScan(),
    BlockedProbabilityScan(),
):
    register_chain_scan_kernel(_kernel)
for _affine in (SequentialAffineScan(), BlockedAffineScan()):
    register_affine_scan_kernel(_affine)
