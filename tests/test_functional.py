"""Specification of the simplex maps in structattn.functional (eager kernels).

The compiled path is exercised in tests/test_functional_compile.py; here every test runs the plain
eager kernels, which are the same functions without torch.compile.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structattn import functional
from structattn.functional import entmax15, entmax_bisect, masked_softmax, sparsemax
from structattn.nn.simplex import Entmax15, EntmaxBisect, Sparsemax

torch.set_num_threads(1)

ALL_MAPS = {
    "softmax": masked_softmax,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "bisect1.3": lambda x, dim=-1, mask=None: entmax_bisect(x, 1.3, dim=dim, mask=mask),
    "bisect2.5": lambda x, dim=-1, mask=None: entmax_bisect(x, 2.5, dim=dim, mask=mask),
}
HYPOTHESIS = settings(deadline=None, max_examples=40, derandomize=True)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setattr(functional, "COMPILE", False)


# ---------------------------------------------------------------------------------------------
# Brute-force references, float64, one row at a time
# ---------------------------------------------------------------------------------------------


def reference_sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Sort-based sparsemax: the largest k with 1 + k z_(k) > sum_{j<=k} z_(j) is the support."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for index, row in enumerate(scores.double().reshape(-1, scores.shape[-1])):
        ordered = sorted(row.tolist(), reverse=True)
        total, support, support_sum = 0.0, 0, 0.0
        for k, value in enumerate(ordered, start=1):
            total += value
            if 1.0 + k * value > total:
                support, support_sum = k, total
        tau = (support_sum - 1.0) / support
        out.view(-1, scores.shape[-1])[index] = (row - tau).clamp(min=0.0)
    return out


def reference_entmax15(scores: torch.Tensor) -> torch.Tensor:
    """Sort-based 1.5-entmax: try every support size k, keep the consistent threshold."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for index, row in enumerate(scores.double().reshape(-1, scores.shape[-1])):
        half = (row / 2).tolist()
        ordered = sorted(half, reverse=True)
        tau = None
        for k in range(1, len(ordered) + 1):
            top = ordered[:k]
            mean = sum(top) / k
            spread = sum((v - mean) ** 2 for v in top)
            if spread > 1.0:
                break
            candidate = mean - math.sqrt((1.0 - spread) / k)
            if candidate <= ordered[k - 1]:
                tau = candidate
        out.view(-1, scores.shape[-1])[index] = ((row / 2 - tau).clamp(min=0.0)) ** 2
    return out


def reference_entmax(
    scores: torch.Tensor, alpha: float | torch.Tensor, steps: int = 200
) -> torch.Tensor:
    """alpha-entmax by plain bisection in float64 on [max - 1, max]; ``alpha`` a number or
    ``(rows, 1)``."""
    x = scores.double() * (alpha - 1)
    x = x - x.amax(-1, keepdim=True)
    lower = torch.full_like(x[..., :1], -1.0)
    upper = torch.zeros_like(lower)
    for _ in range(steps):
        middle = (lower + upper) / 2
        total = ((x - middle).clamp(min=0.0) ** (1 / (alpha - 1))).sum(-1, keepdim=True)
        lower = torch.where(total >= 1, middle, lower)
        upper = torch.where(total >= 1, upper, middle)
    probs = (x - lower).clamp(min=0.0) ** (1 / (alpha - 1))
    return probs / probs.sum(-1, keepdim=True)


def random_scores(*shape, scale=1.0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype) * scale


# ---------------------------------------------------------------------------------------------
# Exact values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 10.0, 1e4])
@pytest.mark.parametrize("keys", [1, 2, 7, 64, 300])
def test_sparsemax_matches_sort_reference(scale, keys):
    scores = random_scores(6, keys, scale=scale, seed=keys)
    torch.testing.assert_close(sparsemax(scores), reference_sparsemax(scores), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 10.0, 1e4])
@pytest.mark.parametrize("keys", [1, 2, 7, 64, 300])
def test_entmax15_matches_sort_reference(scale, keys):
    scores = random_scores(6, keys, scale=scale, seed=keys)
    torch.testing.assert_close(entmax15(scores), reference_entmax15(scores), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 1.75, 2.0, 2.5, 4.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_entmax_bisect_matches_bisection_reference_in_float64(alpha, scale):
    scores = random_scores(8, 50, scale=scale, seed=int(alpha * 10))
    torch.testing.assert_close(
        entmax_bisect(scores, alpha), reference_entmax(scores, alpha), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 2.0])
def test_entmax_bisect_with_tensor_alpha_matches_bisection_reference(alpha):
    scores = random_scores(5, 40, seed=3)
    alpha_tensor = torch.full((5, 1), alpha, dtype=torch.float64)
    torch.testing.assert_close(
        entmax_bisect(scores, alpha_tensor), reference_entmax(scores, alpha), atol=1e-10, rtol=0
    )


def test_maps_agree_with_the_entmax_package_in_float32():
    entmax = pytest.importorskip("entmax")
    scores = random_scores(64, 100, dtype=torch.float32, seed=5)
    torch.testing.assert_close(sparsemax(scores), entmax.sparsemax(scores, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(entmax15(scores), entmax.entmax15(scores, -1), atol=1e-6, rtol=0)
    for alpha in (1.25, 1.75):
        torch.testing.assert_close(
            entmax_bisect(scores, alpha),
            entmax.entmax_bisect(scores, alpha, -1),
            atol=2e-6,
            rtol=0,
        )


def test_alpha_one_is_softmax_where_the_entmax_package_is_uniform():
    scores = random_scores(4, 9, seed=1)
    torch.testing.assert_close(entmax_bisect(scores, 1.0), torch.softmax(scores, -1))
    mixed = torch.tensor([[1.0], [1.5], [1.0], [2.0]], dtype=torch.float64)
    expected = torch.stack(
        [
            torch.softmax(scores[0], -1),
            reference_entmax15(scores[1:2])[0],
            torch.softmax(scores[2], -1),
            reference_sparsemax(scores[3:4])[0],
        ]
    )
    torch.testing.assert_close(entmax_bisect(scores, mixed), expected, atol=1e-10, rtol=0)


def test_alpha_two_is_sparsemax_and_alpha_one_and_a_half_is_entmax15():
    scores = random_scores(4, 30, seed=2)
    torch.testing.assert_close(entmax_bisect(scores, 2.0), sparsemax(scores))
    torch.testing.assert_close(entmax_bisect(scores, 1.5), entmax15(scores))
    near_two = torch.full((4, 1), 2.0, dtype=torch.float64)
    torch.testing.assert_close(
        entmax_bisect(scores, near_two), sparsemax(scores), atol=1e-10, rtol=0
    )


def test_masked_softmax_without_mask_is_softmax():
    scores = random_scores(3, 5, 7, seed=4)
    for dim in (0, 1, 2, -1):
        torch.testing.assert_close(masked_softmax(scores, dim), torch.softmax(scores, dim))


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------

rows = st.lists(
    st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=24,
)


@HYPOTHESIS
@given(row=rows, name=st.sampled_from(sorted(ALL_MAPS)))
def test_output_lies_on_the_simplex(row, name):
    probs = ALL_MAPS[name](torch.tensor([row], dtype=torch.float64))
    assert bool((probs >= 0).all())
    assert abs(probs.sum().item() - 1.0) < 1e-9


@HYPOTHESIS
@given(row=rows)
def test_sparsemax_support_is_consistent_with_one_threshold(row):
    scores = torch.tensor(row, dtype=torch.float64)
    probs = sparsemax(scores)
    support = probs > 0
    tau = (scores[support] - probs[support]).mean()
    torch.testing.assert_close(probs, (scores - tau).clamp(min=0.0), atol=1e-9, rtol=0)
    assert bool((scores[~support] <= tau + 1e-9).all())


@HYPOTHESIS
@given(row=rows)
def test_entmax15_support_is_consistent_with_one_threshold(row):
    scores = torch.tensor(row, dtype=torch.float64)
    probs = entmax15(scores)
    support = probs > 0
    tau = (scores[support] / 2 - probs[support].sqrt()).mean()
    torch.testing.assert_close(probs, (scores / 2 - tau).clamp(min=0.0) ** 2, atol=1e-9, rtol=0)
    assert bool((scores[~support] / 2 <= tau + 1e-9).all())


@HYPOTHESIS
@given(
    row=rows, shift=st.floats(min_value=-1e3, max_value=1e3), name=st.sampled_from(sorted(ALL_MAPS))
)
def test_adding_a_constant_changes_nothing(row, shift, name):
    scores = torch.tensor([row], dtype=torch.float64)
    fn = ALL_MAPS[name]
    torch.testing.assert_close(fn(scores + shift), fn(scores), atol=1e-9, rtol=0)


@HYPOTHESIS
@given(row=rows, seed=st.integers(0, 2**16), name=st.sampled_from(sorted(ALL_MAPS)))
def test_permuting_scores_permutes_probabilities(row, seed, name):
    scores = torch.tensor([row], dtype=torch.float64)
    order = torch.randperm(len(row), generator=torch.Generator().manual_seed(seed))
    fn = ALL_MAPS[name]
    torch.testing.assert_close(fn(scores[:, order]), fn(scores)[:, order], atol=1e-12, rtol=0)


@HYPOTHESIS
@given(row=rows)
def test_sparse_maps_match_their_sort_references_on_arbitrary_rows(row):
    scores = torch.tensor([row], dtype=torch.float64)
    torch.testing.assert_close(sparsemax(scores), reference_sparsemax(scores), atol=1e-10, rtol=0)
    torch.testing.assert_close(entmax15(scores), reference_entmax15(scores), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# Exactness proof and its fall-backs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_unproven_rows_are_continued_or_sorted_to_the_exact_answer(monkeypatch, rounds):
    monkeypatch.setattr(functional, "_MICHELOT_STEPS", 1)
    monkeypatch.setattr(functional, "_QUADRATIC_STEPS", 1)
    monkeypatch.setattr(functional, "_QUADRATIC_STEPS_SHORT_ROWS", 1)
    monkeypatch.setattr(functional, "_CONTINUATION_ROUNDS", rounds)
    scores = random_scores(20, 200, scale=0.1, seed=6)
    torch.testing.assert_close(sparsemax(scores), reference_sparsemax(scores), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax15(scores), reference_entmax15(scores), atol=1e-12, rtol=0)


def test_ties_at_the_threshold_give_the_exact_answer():
    # Equal scores straddle the threshold exactly; the proof rejects them and the sort decides.
    scores = torch.tensor(
        [[1.0, 1.0, 1.0, 0.0, 0.0], [0.5, 0.5, -0.5, -0.5, -0.5]], dtype=torch.float64
    )
    torch.testing.assert_close(sparsemax(scores), reference_sparsemax(scores), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax15(scores), reference_entmax15(scores), atol=1e-12, rtol=0)


def test_entmax_bisect_honours_n_iter_and_stops_early(monkeypatch):
    calls = []
    kernel = functional._bisect_kernel

    def counting(*args, **options):
        calls.append(1)
        return kernel(*args, **options)

    monkeypatch.setattr(functional, "_bisect_kernel", counting)
    scores = random_scores(10, 64, scale=3.0, seed=7)
    exact = entmax_bisect(scores, 1.3, n_iter=200)
    assert len(calls) < 20
    one_step = entmax_bisect(scores, 1.3, n_iter=1)
    assert (one_step - exact).abs().max() > 1e-6
    assert bool((one_step >= 0).all())
    torch.testing.assert_close(one_step.sum(-1), torch.ones(10, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_gradcheck_without_mask(name):
    scores = random_scores(3, 7, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(ALL_MAPS[name], (scores,))


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_gradcheck_with_mask_and_other_dim(name):
    scores = random_scores(7, 3, seed=9).requires_grad_()
    mask = torch.rand(7, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0] = True
    assert torch.autograd.gradcheck(lambda x: ALL_MAPS[name](x, dim=0, mask=mask), (scores,))


def test_gradcheck_with_respect_to_alpha():
    scores = random_scores(4, 6, seed=10)
    alpha = torch.tensor([[1.2], [1.5], [1.9], [3.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: entmax_bisect(scores, a, tol=1e-14), (alpha,))
    shared = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: entmax_bisect(scores, a, tol=1e-14), (shared,))


def test_backward_matches_autograd_through_the_closed_form():
    scores = random_scores(5, 12, seed=11).requires_grad_()
    cotangent = random_scores(5, 12, seed=12)
    (ours,) = torch.autograd.grad(sparsemax(scores), scores, cotangent)
    probs = sparsemax(scores).detach()
    support = (probs > 0).double()
    expected = support * (
        cotangent - (cotangent * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    )
    torch.testing.assert_close(ours, expected)


# ---------------------------------------------------------------------------------------------
# Masks and padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_masked_keys_get_exactly_zero_probability_and_gradient(name):
    scores = random_scores(4, 10, scale=5.0, seed=13)
    scores[:, 7:] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    scores.requires_grad_()
    mask = torch.ones(10, dtype=torch.bool)
    mask[7:] = False
    probs = ALL_MAPS[name](scores, mask=mask)
    assert bool((probs[:, 7:] == 0).all())
    probs.backward(random_scores(4, 10, seed=14))
    assert bool((scores.grad[:, 7:] == 0).all())
    assert bool(torch.isfinite(scores.grad).all())


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_padded_rows_equal_unpadded_rows(name):
    fn = ALL_MAPS[name]
    lengths = [3, 8, 1, 5]
    scores = random_scores(4, 8, scale=2.0, seed=15)
    mask = torch.arange(8) < torch.tensor(lengths)[:, None]
    padded = fn(scores, mask=mask)
    for row, length in enumerate(lengths):
        alone = fn(scores[row, :length])
        torch.testing.assert_close(padded[row, :length], alone, atol=1e-12, rtol=0)
        assert bool((padded[row, length:] == 0).all())


def test_mask_broadcasts_over_queries_and_accepts_integers():
    scores = random_scores(2, 3, 6, seed=16)
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    expected = sparsemax(scores, mask=mask.bool().expand(2, 3, 6))
    torch.testing.assert_close(sparsemax(scores, mask=mask), expected)


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_fully_masked_query_gives_zeros_when_validation_is_off(name):
    import pyro

    scores = random_scores(3, 5, seed=17).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    pyro.enable_validation(False)
    probs = ALL_MAPS[name](scores, mask=mask)
    assert bool((probs[1] == 0).all())
    torch.testing.assert_close(probs[[0, 2]].sum(-1), torch.ones(2, dtype=torch.float64))
    probs.backward(torch.ones_like(probs))
    assert bool(torch.isfinite(scores.grad).all())
    assert bool((scores.grad[1] == 0).all())


# ---------------------------------------------------------------------------------------------
# Shapes, dims, dtypes, scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
@pytest.mark.parametrize("dim", [0, 1, -2, 3])
def test_any_dim_and_leading_dims(name, dim):
    fn = ALL_MAPS[name]
    scores = random_scores(3, 4, 5, 6, seed=18)
    expected = fn(scores.movedim(dim, -1)).movedim(-1, dim)
    torch.testing.assert_close(fn(scores, dim=dim), expected)


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_of_scale_1e4_are_stable(name, dtype):
    scores = random_scores(16, 50, scale=1e4, dtype=dtype, seed=19)
    scores[0, :3] = 1e4  # ties at the top
    probs = ALL_MAPS[name](scores)
    assert bool(torch.isfinite(probs).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(16, dtype=dtype))
    expected = ALL_MAPS[name](scores.double())
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(name, dtype):
    scores = random_scores(8, 30, scale=3.0, dtype=torch.float32, seed=20).to(dtype)
    leaf = scores.clone().requires_grad_()
    probs = ALL_MAPS[name](leaf)
    assert probs.dtype == dtype
    assert bool(torch.isfinite(probs).all())
    expected = ALL_MAPS[name](scores.float())
    torch.testing.assert_close(probs.float(), expected, atol=1e-2, rtol=0)
    probs.float().pow(2).sum().backward()
    assert leaf.grad.dtype == dtype
    assert bool(torch.isfinite(leaf.grad).all())


def test_bf16_bisection_has_no_nan_unlike_the_entmax_package():
    scores = (torch.randn(32, 100, generator=torch.Generator().manual_seed(21)) * 4).bfloat16()
    for alpha in (1.25, 1.5, 3.0):
        probs = entmax_bisect(scores, alpha)
        assert bool(torch.isfinite(probs).all())
        assert bool(((probs.float().sum(-1) - 1).abs() < 2e-2).all())


def test_single_key_gets_probability_one():
    for fn in ALL_MAPS.values():
        torch.testing.assert_close(fn(torch.tensor([[3.0]])), torch.tensor([[1.0]]))


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
@pytest.mark.parametrize(
    "bad_value, message",
    [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")],
)
def test_non_finite_valid_score_raises(name, bad_value, message):
    scores = random_scores(2, 4, seed=22)
    scores[1, 2] = bad_value
    with pytest.raises(ValueError, match=f"scores contains {message}"):
        ALL_MAPS[name](scores)


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_fully_masked_query_raises(name):
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="mask masks every key"):
        ALL_MAPS[name](random_scores(2, 2), mask=mask)


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_mask_that_does_not_broadcast_raises(name):
    with pytest.raises(ValueError, match="mask of shape"):
        ALL_MAPS[name](random_scores(2, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="would enlarge"):
        ALL_MAPS[name](random_scores(2, 4), mask=torch.ones(5, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a boolean"):
        ALL_MAPS[name](random_scores(2, 4), mask=torch.ones(2, 4))


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_empty_key_dimension_raises(name):
    with pytest.raises(ValueError, match="empty dimension"):
        ALL_MAPS[name](torch.zeros(3, 0))


@pytest.mark.parametrize("name", sorted(ALL_MAPS))
def test_wrong_dim_raises(name):
    with pytest.raises(ValueError, match="out of range"):
        ALL_MAPS[name](random_scores(2, 3), dim=2)
    with pytest.raises(ValueError, match="0-dimensional"):
        ALL_MAPS[name](torch.tensor(1.0))


def test_non_float_scores_raise():
    with pytest.raises(ValueError, match="floating-point"):
        sparsemax(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        entmax15([[1.0, 2.0]])


@pytest.mark.parametrize("alpha", [0.0, -1.0, 0.5, float("nan"), float("inf")])
def test_invalid_float_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        entmax_bisect(random_scores(2, 3), alpha)


def test_invalid_tensor_alpha_raises():
    scores = random_scores(2, 3)
    with pytest.raises(ValueError, match="alpha of shape"):
        entmax_bisect(scores, torch.full((2, 3), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        entmax_bisect(scores, torch.tensor([[1.5], [0.9]], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or infinite"):
        entmax_bisect(scores, torch.tensor([[1.5], [float("nan")]], dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        entmax_bisect(scores, torch.tensor([[2], [2]]))


def test_invalid_n_iter_and_tol_raise():
    with pytest.raises(ValueError, match="n_iter"):
        entmax_bisect(random_scores(2, 3), 1.3, n_iter=0)
    with pytest.raises(ValueError, match="tol"):
        entmax_bisect(random_scores(2, 3), 1.3, tol=-1.0)


# ---------------------------------------------------------------------------------------------
# Module forms
# ---------------------------------------------------------------------------------------------


def test_modules_match_their_functions():
    scores = random_scores(3, 4, 5, seed=23)
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(2)) > 0.2
    mask[:, 0] = True
    torch.testing.assert_close(Sparsemax(dim=1)(scores, mask), sparsemax(scores, 1, mask))
    torch.testing.assert_close(Entmax15(dim=1)(scores, mask), entmax15(scores, 1, mask))
    torch.testing.assert_close(
        EntmaxBisect(alpha=1.3, dim=1, n_iter=30)(scores, mask),
        entmax_bisect(scores, 1.3, dim=1, mask=mask, n_iter=30),
    )


def test_entmax_bisect_module_learns_alpha():
    alpha = torch.nn.Parameter(torch.tensor([[1.3], [1.6]], dtype=torch.float64))
    module = EntmaxBisect(alpha=alpha)
    module(random_scores(2, 6, seed=24)).pow(2).sum().backward()
    assert alpha.grad is not None and bool((alpha.grad != 0).all())
    assert "alpha=tensor(2, 1)" in repr(module)


# ---------------------------------------------------------------------------------------------
# entmax_bisect: float32 accuracy at any alpha, and the alpha gradient next to alpha = 1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.7, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_entmax_bisect_float32_is_accurate_to_float32_rounding(alpha, scale):
    # The threshold is kept in float64 (high + low pair), so even at alpha = 4, where
    # p = gap^(1/3) is steep next to the threshold, float32 is within a few eps of float64.
    scores = random_scores(256, 64, scale=scale, seed=21, dtype=torch.float32)
    expected = reference_entmax(scores.double(), alpha)
    error = (entmax_bisect(scores, alpha).double() - expected).abs().max()
    assert error <= 6e-7  # five float32 eps; the entmax package: 7e-3 at alpha 4


@pytest.mark.parametrize("alpha", [1.00001, 1.001, 1.01, 1.3, 1.7])
def test_alpha_gradient_in_float32_matches_float64_next_to_alpha_one(alpha):
    scores = random_scores(16, 24, seed=22)
    cotangent = random_scores(16, 24, seed=23)
    gradients = []
    for dtype in (torch.float32, torch.float64):
        alphas = torch.full((16, 1), alpha, dtype=dtype, requires_grad=True)
        out = entmax_bisect(scores.to(dtype), alphas)
        (gradient,) = torch.autograd.grad(out, alphas, cotangent.to(dtype))
        gradients.append(gradient.double())
    relative = (gradients[0] - gradients[1]).abs().max() / gradients[1].abs().max()
    assert relative <= 1e-4


def test_alpha_gradient_at_alpha_one_is_the_softmax_limit():
    # At alpha = 1 the map is the softmax and d p_i / d alpha = p_i (<p, l^2> - l_i^2) / 2
    # with l = log p; a one-sided difference quotient confirms the limit.
    scores = random_scores(5, 9, seed=24)
    cotangent = random_scores(5, 9, seed=25)
    alphas = torch.ones(5, 1, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(entmax_bisect(scores, alphas), alphas, cotangent)
    log_p = torch.log_softmax(scores, -1)
    p = log_p.exp()
    limit = p * ((p * log_p**2).sum(-1, keepdim=True) - log_p**2) / 2
    torch.testing.assert_close(gradient, (cotangent * limit).sum(-1, keepdim=True))
    step = 1e-6
    quotient = (entmax_bisect(scores, 1 + step, tol=1e-15) - torch.softmax(scores, -1)) / step
    torch.testing.assert_close(
        gradient, (cotangent * quotient).sum(-1, keepdim=True), atol=1e-5, rtol=1e-4
    )


def test_gradcheck_with_respect_to_alpha_next_to_one_and_above_two():
    scores = random_scores(4, 6, seed=26)
    alpha = torch.tensor([[1.0001], [1.01], [2.2], [3.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: entmax_bisect(scores, a, tol=1e-15), (alpha,), eps=1e-7, atol=1e-5
    )
