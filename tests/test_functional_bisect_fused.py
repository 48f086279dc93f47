"""entmax_bisect's fused path (binned start, one compiled call, device-side check) and its
cheaper alpha gradient, against the general path and float64 bisection."""

from __future__ import annotations

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_functional import random_scores, reference_entmax

from structattn import functional
from structattn.functional import entmax_bisect

FLOAT32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch, general_entmax_path):
    """The general path's kernels, eager (float32 CPU rows would otherwise take the CPU
    kernel of structattn._native, tested in test_entmax_native.py)."""
    monkeypatch.setattr(functional, "COMPILE", False)


def power_sum(x: torch.Tensor, slack: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``P(tau) = sum [x - tau]_+^(1/slack)`` per row, float64."""
    return ((x - tau).clamp(min=0.0) ** (1 / slack)).sum(-1, keepdim=True)


def scaled_rows(scores: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    return (scores - scores.amax(-1, keepdim=True)) * slack


def record_calls(monkeypatch, *names: str) -> list[tuple[str, int]]:
    """Replace the named kernels by wrappers that record ``(name, rows)`` per call."""
    calls: list[tuple[str, int]] = []

    def recorder(name):
        kernel = getattr(functional, name)

        def recording(*args, **options):
            # _bisect_continue takes all of z and the indices of its rows.
            rows = args[5] if name == "_bisect_continue" else args[0]
            calls.append((name, rows.shape[0]))
            return kernel(*args, **options)

        return recording

    for name in names:
        monkeypatch.setattr(functional, name, recorder(name))
    return calls


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    keys=st.integers(1, 300),
    alpha=st.floats(1.1, 2.0),
    scale=st.sampled_from([0.01, 1.0, 30.0, 100.0]),
    bins=st.sampled_from([8, 16]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_binned_start_is_below_the_threshold(keys, alpha, scale, bins, ties, seed):
    # Jensen: the model of a row lies below P for alpha <= 2, and Newton's steps on the
    # convex model stay below its root, so P(start) >= 1 (in float64, up to rounding).
    scores = random_scores(4, keys, scale=scale, seed=seed)
    if ties:
        scores = scores.round()
    slack = torch.full((4, 1), alpha - 1, dtype=torch.float64)
    x = scaled_rows(scores, slack)
    start = functional._binned_start(x, slack, bins)
    assert bool((start >= -1 - 1e-12).all()) and bool((start < 0).all())
    assert bool((power_sum(x, slack, start) >= 1 - 1e-9).all())


@pytest.mark.parametrize("alpha", [1.3, 1.7])
@pytest.mark.parametrize("keys", [64, 512, 4096])
def test_binned_start_lands_within_a_few_percent_of_the_root(alpha, keys):
    # What makes one Halley pass enough: measured 0.4-2.5% at 16 bins on N(0, 1) rows.
    scores = random_scores(64, keys, seed=keys)
    slack = torch.full((64, 1), alpha - 1, dtype=torch.float64)
    x = scaled_rows(scores, slack)
    start = functional._binned_start(x, slack, 16)
    assert (power_sum(x, slack, start) - 1).abs().max() <= 0.05


def test_binned_start_of_a_fully_masked_row_is_finite():
    x = torch.full((2, 5), float("-inf"), dtype=torch.float64)
    x[1] = torch.tensor([0.0, -0.2, float("-inf"), -0.5, -0.9])
    slack = torch.full((2, 1), 0.5, dtype=torch.float64)
    start = functional._binned_start(x, slack, 8)
    assert bool(torch.isfinite(start).all())


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.7, 2.0 - 1e-9])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("keys", [64, 512])
def test_fused_path_matches_bisection_in_float32_and_float64(alpha, scale, keys, monkeypatch):
    calls = record_calls(monkeypatch, "_bisect_fused")
    scores = random_scores(48, keys, scale=scale, seed=keys + int(scale), dtype=torch.float32)
    expected = reference_entmax(scores.double(), alpha)
    in_float64 = entmax_bisect(scores.double(), alpha)
    in_float32 = entmax_bisect(scores, alpha)
    assert [name for name, _ in calls] == ["_bisect_fused", "_bisect_fused"]
    assert (in_float64 - expected).abs().max() <= 1e-12
    assert (in_float32.double() - expected).abs().max() <= 5 * FLOAT32_EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_with_per_row_alphas_masks_and_a_fully_masked_row(dtype, monkeypatch):
    calls = record_calls(monkeypatch, "_bisect_fused")
    scores = random_scores(40, 100, scale=3.0, seed=2, dtype=dtype)
    alpha = 1.1 + 0.9 * torch.rand(40, 1, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(40, 100, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[:, 0] = True
    mask[7] = False
    pyro.enable_validation(False)  # a query without a valid key is an error otherwise
    probs = entmax_bisect(scores, alpha.to(dtype), mask=mask)
    assert calls == [("_bisect_fused", 40)]
    assert bool((probs[7] == 0).all()) and bool((probs[~mask] == 0).all())
    eps = torch.finfo(dtype).eps
    for row in [0, 1, 8, 39]:
        valid = mask[row]
        expected = reference_entmax(scores[row, valid].double(), alpha[row].item())
        assert (probs[row, valid].double() - expected).abs().max() <= 8 * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_the_fused_call_leaves_unproven_continue_to_the_same_answer(dtype, monkeypatch):
    scores = random_scores(64, 200, scale=2.0, seed=5, dtype=dtype)
    expected = entmax_bisect(scores, 1.7)
    # No Halley pass in the fused call: its probability pass proves only the rows the start
    # got exactly (one key in the support); the others continue alone.
    monkeypatch.setattr(functional, "_FUSED_PASSES", -1 if dtype == torch.float64 else 0)
    calls = record_calls(monkeypatch, "_bisect_fused", "_bisect_continue")
    continued = entmax_bisect(scores, 1.7)
    assert calls[0] == ("_bisect_fused", 64)
    assert calls[1][0] == "_bisect_continue" and 0 < calls[1][1] < 64
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(continued, expected, atol=8 * eps, rtol=0)


def test_passes_stop_early_and_unproven_rows_continue_alone(monkeypatch):
    calls = record_calls(monkeypatch, "_bisect_fused", "_bisect_continue")
    entmax_bisect(random_scores(256, 64, seed=10), 1.7)
    # One fused call on every row first; rows its probability pass could not prove continue
    # in smaller calls.
    assert calls[0] == ("_bisect_fused", 256)
    assert 2 <= len(calls) <= 8
    assert all(rows < 256 for _, rows in calls[1:])


def test_alphas_outside_the_fused_range_or_a_tolerance_take_the_general_path(monkeypatch):
    calls = record_calls(monkeypatch, "_bisect_fused")
    scores = random_scores(8, 30, seed=6)
    entmax_bisect(scores, 1.05)
    entmax_bisect(scores, 2.5)
    entmax_bisect(scores, 1.3, tol=1e-10)
    entmax_bisect(scores, torch.tensor([[1.3]] * 7 + [[2.2]], dtype=torch.float64))
    assert calls == []


@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.7, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_gradient_without_a_power_per_key_matches_the_power(alpha, dtype):
    # The fused backward forms p^(1 - s) from the weight p / gap and one power per row; the
    # alpha-only backward takes the power of every key.  Same gradient.
    scores = random_scores(16, 50, scale=3.0, seed=11, dtype=dtype)
    mask = torch.rand(16, 50, generator=torch.Generator().manual_seed(12)) > 0.3
    mask[:, 0] = True
    z = scores.masked_fill(~mask, float("-inf"))
    slack = torch.full((16, 1), alpha - 1, dtype=torch.float64)
    probs, shift, tau = functional._entmax_bisect_rows(z, slack, 50, None)
    grad = random_scores(16, 50, seed=13, dtype=dtype)
    _, fused = functional._bisect_backward_with_alpha(z, probs, shift, slack, tau, grad)
    powered = functional._alpha_gradient(probs, slack.to(dtype), grad)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fused, powered, atol=1e3 * eps * powered.abs().max(), rtol=0)


@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.7, 2.5])
def test_alpha_gradient_in_float32_within_1e3_of_float64_with_masks(alpha):
    scores = random_scores(32, 300, scale=5.0, seed=14)
    mask = torch.rand(32, 300, generator=torch.Generator().manual_seed(15)) > 0.5
    mask[:, 0] = True
    cotangent = random_scores(32, 300, seed=16)
    gradients = []
    for dtype in (torch.float32, torch.float64):
        alpha_rows = torch.full((32, 1), alpha, dtype=dtype, requires_grad=True)
        probs = entmax_bisect(scores.to(dtype), alpha_rows, mask=mask)
        (gradient,) = torch.autograd.grad(probs, alpha_rows, cotangent.to(dtype))
        gradients.append(gradient.double())
    assert (gradients[0] - gradients[1]).abs().max() <= 1e-3 * gradients[1].abs().max()


def test_gradcheck_through_the_fused_path():
    scores = random_scores(4, 9, seed=17).requires_grad_()
    alpha = torch.tensor([[1.15], [1.3], [1.7], [1.95]], dtype=torch.float64)
    alpha.requires_grad_()
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(18)) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(
        lambda z, a: entmax_bisect(z, a, mask=mask), (scores, alpha), eps=1e-6, atol=1e-5
    )
