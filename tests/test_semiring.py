"""Semiring laws, the sampling and max semirings' gradients, and the kernels of ``_backend``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structattn import _backend
from structattn.distributions.semiring import (
    EntropySemiring,
    LogSemiring,
    MaxSemiring,
    SamplingSemiring,
)

torch.set_num_threads(1)

SEMIRINGS = [LogSemiring, MaxSemiring, EntropySemiring]


def elements(semiring, seed, shape=(4,), scale=3.0):
    """Random semiring elements (for entropy: a log weight and a nonnegative entropy)."""
    generator = torch.Generator().manual_seed(seed)
    log_weight = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    if semiring is EntropySemiring:
        entropy = torch.rand(shape, generator=generator, dtype=torch.float64)
        return torch.stack([log_weight, entropy])
    return log_weight


def plus(semiring, left, right):
    return semiring.sum(torch.stack([left, right], -1), -1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 30.0, 100.0]))
@pytest.mark.parametrize("semiring", SEMIRINGS, ids=lambda s: s.name)
def test_semiring_laws_hold(semiring, seed, scale):
    x, y, z = (elements(semiring, seed + k, scale=scale) for k in range(3))
    close = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(plus(semiring, x, y), plus(semiring, y, x), **close)
    torch.testing.assert_close(
        plus(semiring, plus(semiring, x, y), z), plus(semiring, x, plus(semiring, y, z)), **close
    )
    torch.testing.assert_close(semiring.times(x, y), semiring.times(y, x), **close)
    torch.testing.assert_close(
        semiring.times(semiring.times(x, y), z), semiring.times(x, semiring.times(y, z)), **close
    )
    torch.testing.assert_close(
        semiring.times(x, plus(semiring, y, z)),
        plus(semiring, semiring.times(x, y), semiring.times(x, z)),
        **close,
    )
    torch.testing.assert_close(semiring.times(x, semiring.one(x)), x, **close)
    torch.testing.assert_close(plus(semiring, x, semiring.zero(x)), x, **close)


@pytest.mark.parametrize("semiring", SEMIRINGS, ids=lambda s: s.name)
def test_matmul_and_matvec_follow_sum_and_times(semiring):
    left = elements(semiring, 1, shape=(2, 3, 4))
    right = elements(semiring, 2, shape=(2, 4, 5))
    product = semiring.matmul(left, right)
    for i in range(3):
        for k in range(5):
            entry = semiring.sum(semiring.times(left[..., i, :], right[..., :, k]), -1)
            torch.testing.assert_close(product[..., i, k], entry)
    vector = right[..., :, 0]
    torch.testing.assert_close(semiring.matvec(left, vector), product[..., :, 0])


def test_entropy_semiring_gives_the_entropy_of_a_categorical():
    logits = elements(LogSemiring, 3, shape=(6,), scale=30.0)
    total = EntropySemiring.sum(EntropySemiring.lift(logits), -1)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(total[0], torch.logsumexp(logits, 0))
    torch.testing.assert_close(total[1], expected)


def test_entropy_semiring_ignores_impossible_alternatives_and_keeps_gradients_finite():
    logits = torch.tensor([0.0, float("-inf"), 1.0], dtype=torch.float64, requires_grad=True)
    value = EntropySemiring.sum(EntropySemiring.lift(logits), -1)[1]
    (grad,) = torch.autograd.grad(value, logits)
    finite = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(value, torch.distributions.Categorical(logits=finite).entropy())
    assert torch.isfinite(grad).all() and grad[1] == 0


def test_max_semiring_gradient_is_one_hot_even_on_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(MaxSemiring.sum(scores, -1).sum(), scores)
    assert grad.sum() == 1 and ((grad == 0) | (grad == 1)).all() and grad[0, 1:3].sum() == 1


def test_sampling_semiring_gradient_draws_with_softmax_frequencies():
    torch.manual_seed(0)
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0]).expand(20000, 4).clone().requires_grad_(True)
    value = SamplingSemiring.sum(logits, -1)
    torch.testing.assert_close(value.detach(), torch.logsumexp(logits.detach(), -1))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert ((grad == 0) | (grad == 1)).all() and (grad.sum(-1) == 1).all()
    frequencies = grad.mean(0)
    assert (frequencies - torch.softmax(logits[0].detach(), -1)).abs().max() < 0.015


# ------------------------------------------------------------------------- the kernels
def log_scan_reference(matrices, start):
    """Exact log messages by the plain recursion, in float64."""
    message = start.double()
    messages = [message]
    for n in range(matrices.shape[1]):
        message = torch.logsumexp(matrices[:, n].double() + message.unsqueeze(-2), -1)
        messages.append(message)
    return torch.stack(messages, 1)


CHAIN_KERNELS = [
    _backend.SequentialScan(),
    _backend.ProbabilityScan(),
    _backend.BlockedProbabilityScan(),
    _backend.BlockedLogScan(),
]


@pytest.mark.parametrize("kernel", CHAIN_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("num_steps, num_states", [(1, 2), (7, 3), (30, 2), (77, 4)])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_every_chain_kernel_gives_exact_log_messages(kernel, dtype, num_steps, num_states, scale):
    generator = torch.Generator().manual_seed(num_steps * 10 + num_states)
    matrices = scale * torch.randn(3, num_steps, num_states, num_states, generator=generator)
    start = scale * torch.randn(3, num_states, generator=generator)
    matrices, start = matrices.to(dtype), start.to(dtype)
    if isinstance(kernel, _backend.ProbabilityScan | _backend.BlockedProbabilityScan):
        if not _backend._probability_space_is_exact(matrices, start):
            # beyond its exact range a probability-space kernel must decline
            assert not kernel.applies(LogSemiring, matrices, start)
            return
    messages, log_scale = kernel.scan(LogSemiring, matrices, start)
    exact = log_scan_reference(matrices, start)
    got = messages.double() + log_scale.double().unsqueeze(-1)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-6
    relative = (got - exact).abs() / (1 + exact.abs())
    assert relative.max() < tolerance
    # messages are shifted to a maximum of zero, so float32 keeps one step's precision
    torch.testing.assert_close(messages.amax(-1), torch.zeros_like(messages[..., 0]))


def test_kernel_selection_prefers_probability_space_and_blocks_for_few_states():
    small = torch.randn(2, 100, 2, 2)
    start = torch.zeros(2, 2)
    assert _backend.select_chain_scan_kernel(LogSemiring, small, start).name == (
        "blocked-probability"
    )
    assert _backend.select_chain_scan_kernel(LogSemiring, 1000 * small, start).name == (
        "blocked-log"
    )
    wide = torch.randn(2, 100, 8, 8)
    assert _backend.select_chain_scan_kernel(LogSemiring, wide, torch.zeros(2, 8)).name == (
        "probability"
    )
    assert _backend.select_chain_scan_kernel(MaxSemiring, small, start).name == "sequential"
    assert _backend.select_chain_scan_kernel(SamplingSemiring, small, start).name == "sequential"


def test_a_user_kernel_registered_first_is_used():
    class Recording(_backend.SequentialScan):
        name = "recording"
        calls = 0

        def scan(self, semiring, matrices, start):
            type(self).calls += 1
            return super().scan(semiring, matrices, start)

    kernel = _backend.register_chain_scan_kernel(Recording())
    try:
        from structattn.distributions.chain import LinearChainCRF

        assert torch.isfinite(LinearChainCRF(torch.randn(2, 5, 3, 3)).partition).all()
        assert Recording.calls == 1
    finally:
        _backend.CHAIN_SCAN_KERNELS.remove(kernel)
    with pytest.raises(ValueError, match="kernel"):
        _backend.register_chain_scan_kernel(object())


@pytest.mark.parametrize("num_steps, num_states", [(1, 2), (30, 2), (77, 3), (40, 5)])
def test_affine_kernels_agree(num_steps, num_states):
    generator = torch.Generator().manual_seed(num_steps)
    matrices = torch.rand(2, num_steps, num_states, num_states, generator=generator).double()
    matrices = matrices / matrices.sum(-1, keepdim=True)
    offsets = torch.randn(2, num_steps, num_states, generator=generator).double()
    start = torch.randn(2, num_states, generator=generator).double()
    expected = [start]
    for n in range(num_steps):
        expected.append(matrices[:, n] @ expected[-1].unsqueeze(-1))
        expected[-1] = expected[-1].squeeze(-1) + offsets[:, n]
    expected = torch.stack(expected, 1)
    for kernel in (_backend.SequentialAffineScan(), _backend.BlockedAffineScan()):
        torch.testing.assert_close(kernel.scan(matrices, offsets, start), expected)


def test_computation_dtype_keeps_float64_and_widens_half():
    assert _backend.computation_dtype(torch.float64) == torch.float64
    assert _backend.computation_dtype(torch.float16) == torch.float32
    assert _backend.computation_dtype(torch.bfloat16) == torch.float32
    assert _backend.block_size(2048) == round(math.sqrt(2048))
