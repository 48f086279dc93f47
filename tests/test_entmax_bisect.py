"""entmax_bisect's fast paths: the start bound, the plain passes, float32 against float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_functional import random_scores, reference_entmax

from structattn import functional
from structattn.functional import entmax_bisect

FLOAT32_EPS = torch.finfo(torch.float32).eps


def power_sum(scores: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``P(tau) = sum [(alpha - 1)(z - max) - tau]_+^(1/(alpha - 1))`` per row, in float64."""
    x = (alpha - 1) * (scores - scores.amax(-1, keepdim=True))
    return ((x - tau).clamp(min=0.0) ** (1 / (alpha - 1))).sum(-1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(
    keys=st.integers(1, 300),
    alpha=st.floats(1.05, 4.0),
    scale=st.sampled_from([0.01, 1.0, 30.0, 100.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_start_is_a_lower_bound_on_the_threshold(keys, alpha, scale, ties, seed):
    # P(lower) >= 1 says lower <= tau: the bracket the root-finding starts from is valid.
    scores = random_scores(4, keys, scale=scale, seed=seed)
    if ties:
        scores = scores.round()
    slack = torch.full((4, 1), alpha - 1, dtype=torch.float64)
    _, lower = functional._bisect_start(scores, slack)
    assert bool((lower >= -1).all()) and bool((lower < 0).all())
    total = power_sum(scores, slack + 1, lower)
    assert bool((total >= 1 - 1e-12).all()), (total.min().item(), lower)


def test_start_bound_is_tighter_than_minus_one_on_most_rows():
    # The generic bound is -1 (the row maximum alone); counting keys does better on
    # most N(0, 1) rows (83% here; a row with few keys near its maximum keeps -1).
    scores = random_scores(64, 512, seed=1)
    slack = torch.full((64, 1), 0.7, dtype=torch.float64)
    _, lower = functional._bisect_start(scores, slack)
    assert (lower > -1).double().mean() >= 0.75


@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.7, 2.5])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("keys", [64, 512])
def test_float32_agrees_with_float64_at_any_scale(alpha, scale, keys):
    scores = random_scores(64, keys, scale=scale, seed=keys + int(scale), dtype=torch.float32)
    expected = reference_entmax(scores.double(), alpha)
    in_float64 = entmax_bisect(scores.double(), alpha)
    in_float32 = entmax_bisect(scores, alpha)
    assert (in_float64 - expected).abs().max() <= 1e-12
    # Five float32 eps: measured 0-3.5e-7 (the softmax itself is off by up to 1.4e-7 here).
    assert (in_float32.double() - expected).abs().max() <= 5 * FLOAT32_EPS
    assert bool(((in_float32 > 0) == (expected > 1e-6)).logical_or(expected <= 1e-6).all())


@pytest.mark.parametrize("alpha", [1.3, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_passes_agree_with_precise_passes(alpha, dtype, monkeypatch):
    # The plain float passes only choose the next threshold; the precise probability pass
    # checks the last one, so both routes end within the tolerance of each other.
    scores = random_scores(128, 300, scale=3.0, seed=4, dtype=dtype)
    fast = entmax_bisect(scores, alpha)
    monkeypatch.setattr(functional, "_PLAIN_MIN_SLACK", math.inf)  # every pass precise
    precise = entmax_bisect(scores, alpha)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fast, precise, atol=8 * eps, rtol=0)
    torch.testing.assert_close(fast.sum(-1), torch.ones(128, dtype=dtype), atol=4 * eps, rtol=0)


def test_no_subnormal_probabilities_next_to_alpha_one():
    # Powers below the smallest normal float are flushed to exactly 0 (subnormal arithmetic
    # made whole passes 2.5x slower); those keys are below anything representable next to 1.
    scores = random_scores(32, 200, scale=30.0, seed=6, dtype=torch.float32)
    probs = entmax_bisect(scores, 1.02)
    tiny = torch.finfo(torch.float32).tiny
    assert bool(((probs == 0) | (probs >= tiny)).all())
    expected = reference_entmax(scores.double(), 1.02)
    assert (probs.double() - expected).abs().max() <= 5 * FLOAT32_EPS


@pytest.mark.parametrize("keys", [64, 512])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_learned_alpha_gradient_float32_within_1e3_of_float64(keys, scale):
    # The benchmark's setting: one alpha per row in [1.2, 1.8], a quarter next to alpha = 1.
    rows = 64
    generator = torch.Generator().manual_seed(keys)
    base = 1.2 + 0.6 * torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    base[: rows // 4] = 1.0 + 1e-5
    assert_float32_gradients_within_1e3_of_float64(
        random_scores(rows, keys, scale=scale, seed=7), base, random_scores(rows, keys, seed=8))


def assert_float32_gradients_within_1e3_of_float64(
    scores: torch.Tensor, alpha: torch.Tensor, cotangent: torch.Tensor
) -> None:
    """entmax_bisect's gradients (alpha's and the scores') in float32 within 1e-3 of the
    largest float64 gradient."""
    gradients = {}
    for dtype in (torch.float32, torch.float64):
        learned = alpha.to(dtype).requires_grad_(True)
        leaf = scores.to(dtype).requires_grad_(True)
        entmax_bisect(leaf, learned).backward(cotangent.to(dtype))
        gradients[dtype] = (learned.grad.double(), leaf.grad.double())
    for ours, exact in zip(gradients[torch.float32], gradients[torch.float64], strict=True):
        assert (ours - exact).abs().max() <= 1e-3 * exact.abs().max()


def test_gradcheck_with_mask_and_a_tensor_alpha_through_the_fused_backward():
    scores = random_scores(5, 9, seed=9).requires_grad_()
    alpha = torch.tensor([[1.0001], [1.2], [1.7], [2.0], [3.0]], dtype=torch.float64)
    alpha.requires_grad_()
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(
        lambda z, a: entmax_bisect(z, a, mask=mask, tol=1e-15), (scores, alpha),
        eps=1e-7, atol=1e-5,
    )
    probs = entmax_bisect(scores, alpha, mask=mask)
    (grad_z,) = torch.autograd.grad(probs, scores, torch.ones_like(probs), retain_graph=True)
    assert bool((grad_z[~mask] == 0).all())
