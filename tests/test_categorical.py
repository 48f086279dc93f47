"""CategoricalAlignment, SparsemaxAlignment and RelaxedAlignment as distributions."""

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import kl_divergence

from structattn.distributions import CategoricalAlignment, RelaxedAlignment, SparsemaxAlignment

torch.set_num_threads(1)


def _scores(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _key_mask(batch, queries, keys):
    lengths = torch.tensor([keys, keys - 2, 1])[:batch]
    return (torch.arange(keys) < lengths[:, None])[:, None, :].expand(batch, queries, keys)


def test_attention_is_masked_softmax_with_exact_zeros():
    scores = _scores(3, 2, 5)
    mask = _key_mask(3, 2, 5)
    dist = CategoricalAlignment(logits=scores, mask=mask)
    expected = scores.masked_fill(~mask, -math.inf).softmax(-1)
    assert torch.allclose(dist.attention, expected)
    assert (dist.attention[~mask] == 0).all()
    assert dist.batch_shape == (3, 2) and dist.event_shape == ()


def test_masked_keys_get_zero_gradient():
    scores = _scores(3, 2, 5).requires_grad_()
    mask = _key_mask(3, 2, 5)
    dist = CategoricalAlignment(logits=scores, mask=mask)
    (dist.attention * torch.randn(3, 2, 5, dtype=torch.float64)).sum().backward()
    assert (scores.grad[~mask] == 0).all()
    assert scores.grad[mask].abs().sum() > 0


def test_mask_broadcasts_from_key_lengths():
    scores = _scores(3, 4, 5)
    key_mask = torch.arange(5) < torch.tensor([5, 3, 2])[:, None]
    dist = CategoricalAlignment(logits=scores, mask=key_mask[:, None, :])
    assert (dist.attention[1, :, 3:] == 0).all()
    assert torch.allclose(dist.attention.sum(-1), torch.ones(3, 4, dtype=torch.float64))


def test_probs_constructor_masks_and_normalises():
    probs = torch.rand(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True])
    dist = CategoricalAlignment(probs=probs, mask=mask)
    assert (dist.attention[..., 2] == 0).all()
    assert torch.allclose(dist.attention.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_entropy_matches_brute_force_with_padding():
    scores = _scores(3, 2, 5)
    mask = _key_mask(3, 2, 5)
    dist = CategoricalAlignment(logits=scores, mask=mask)
    probs = dist.attention
    brute = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    assert torch.allclose(dist.entropy(), brute)
    assert torch.isfinite(dist.entropy()).all()


def test_kl_matches_brute_force_and_is_zero_for_itself():
    mask = _key_mask(3, 2, 5)
    p = CategoricalAlignment(logits=_scores(3, 2, 5), mask=mask)
    q = CategoricalAlignment(logits=_scores(3, 2, 5), mask=mask)
    pp, qp = p.attention, q.attention
    brute = torch.where(mask, pp * (pp.clamp_min(1e-300).log() - qp.clamp_min(1e-300).log()), 0)
    assert torch.allclose(kl_divergence(p, q), brute.sum(-1))
    assert torch.allclose(kl_divergence(p, p), torch.zeros(3, 2, dtype=torch.float64))


def test_kl_is_infinite_when_p_puts_mass_where_q_forbids():
    scores = _scores(1, 1, 4)
    p = CategoricalAlignment(logits=scores)
    q = CategoricalAlignment(logits=scores, mask=torch.tensor([True, True, True, False]))
    assert torch.isinf(kl_divergence(p, q)).all()
    assert torch.isfinite(kl_divergence(q, p)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_infinite_where_q_was_built_with_zero_probabilities(dtype):
    """Zeros given in ``probs=`` (or masked there) are forbidden keys, like masked logits."""
    p = CategoricalAlignment(logits=torch.zeros(1, 3, dtype=dtype))
    zero = CategoricalAlignment(probs=torch.tensor([[0.5, 0.5, 0.0]], dtype=dtype))
    masked = CategoricalAlignment(probs=torch.tensor([[0.5, 0.3, 0.2]], dtype=dtype),
                                  mask=torch.tensor([True, True, False]))
    assert torch.isinf(kl_divergence(p, zero)).all()
    assert torch.isinf(kl_divergence(p, masked)).all()
    assert torch.isfinite(kl_divergence(zero, p)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [30.0, 120.0, 800.0])
def test_kl_is_finite_where_the_priors_probability_only_underflows(dtype, gap):
    """A key whose prior probability underflows (a logit ``gap`` below the best, past the
    dtype's smallest number at 120 in float32 and 800 in float64) is allowed, not forbidden:
    the KL is the finite value float64 logits give, whatever the dtype."""
    guide_logits = torch.tensor([[0.0, 0.0, -1.0]])
    prior_logits = torch.tensor([[0.0, -gap, 2.0]])
    guide = CategoricalAlignment(logits=guide_logits.to(dtype))
    prior = CategoricalAlignment(logits=prior_logits.to(dtype))
    found = kl_divergence(guide, prior)
    g = guide_logits.double().log_softmax(-1)
    expected = (g.exp() * (g - prior_logits.double().log_softmax(-1))).sum(-1)
    assert torch.isfinite(found).all()
    assert torch.allclose(found.double(), expected, rtol=1e-5)


def test_expand_keeps_class_and_values():
    dist = CategoricalAlignment(logits=_scores(2, 5), mask=torch.tensor([1, 1, 1, 0, 0]))
    big = dist.expand((4, 2))
    assert type(big) is CategoricalAlignment
    assert big.batch_shape == (4, 2)
    assert torch.equal(big.attention[3], dist.attention)


def test_log_prob_broadcasts_enumerated_values():
    dist = CategoricalAlignment(logits=_scores(3, 2, 4))
    support = dist.enumerate_support(expand=False)
    assert support.shape == (4, 1, 1)
    log_prob = dist.log_prob(support)
    assert log_prob.shape == (4, 3, 2)
    assert torch.allclose(log_prob.exp().sum(0), torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logits=torch.tensor([[0.0, float("nan")]])), "NaN"),
        (dict(logits=torch.tensor([[0.0, float("inf")]])), "infinite"),
        (dict(logits=torch.tensor([[0.0, -float("inf")]])), "infinite"),
        (dict(logits=torch.zeros(2, 0)), "empty"),
        (
            dict(
                logits=torch.zeros(2, 3),
                mask=torch.tensor([[True, False, True], [False, False, False]]),
            ),
            "every key",
        ),
        (dict(logits=torch.zeros(2, 3), mask=torch.ones(2, 4, dtype=torch.bool)), "broadcast"),
        (dict(logits=torch.zeros(2, 3), mask=torch.ones(5, 2, 3, dtype=torch.bool)), "enlarge"),
        (dict(logits=torch.tensor(1.0)), "key dimension"),
        (dict(), "exactly one"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CategoricalAlignment(**kwargs)


def test_nan_at_masked_positions_is_allowed():
    logits = torch.tensor([[0.0, 1.0, float("nan")]])
    dist = CategoricalAlignment(logits=logits, mask=torch.tensor([True, True, False]))
    assert torch.isfinite(dist.attention).all()


def test_validation_can_be_switched_off():
    pyro.enable_validation(False)
    dist = CategoricalAlignment(
        logits=torch.zeros(2, 3), mask=torch.tensor([[True, False, True], [False] * 3])
    )
    assert dist.attention.shape == (2, 3)


# --- SparsemaxAlignment -----------------------------------------------------------------


def _sparse_scores():
    return torch.tensor(
        [
            [[3.0, 2.5, -1.0, -2.0, 0.0], [0.1, 0.0, 0.2, -0.1, 0.05]],
            [[5.0, -5.0, -5.0, -5.0, -5.0], [1.0, 1.0, -3.0, -3.0, -3.0]],
        ],
        dtype=torch.float64,
    )


def _sparsemax_reference(scores):
    """Sort-based sparsemax in float64 (Martins & Astudillo 2016), written for the tests."""
    z, _ = scores.sort(-1, descending=True)
    k = torch.arange(1, scores.shape[-1] + 1, dtype=scores.dtype)
    cumsum = z.cumsum(-1)
    support = 1 + k * z > cumsum
    k_star = support.sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, k_star - 1) - 1) / k_star
    return (scores - tau).clamp_min(0)


def test_sparsemax_alignment_probabilities_are_sparsemax():
    scores = _sparse_scores()
    dist = SparsemaxAlignment(scores=scores)
    assert torch.allclose(dist.attention, _sparsemax_reference(scores))
    assert (dist.attention == 0).any()
    assert torch.equal(dist.support_size(), (_sparsemax_reference(scores) > 0).sum(-1))


def test_sparsemax_enumerate_support_lists_only_the_union_of_supports():
    scores = _sparse_scores()
    dist = SparsemaxAlignment(scores=scores)
    support = dist.enumerate_support(expand=False)
    union = (_sparsemax_reference(scores) > 0).reshape(-1, 5).any(0).nonzero().squeeze(-1)
    assert torch.equal(support.reshape(-1), union)
    assert support.shape == (len(union), 1, 1)
    # the enumerated values carry all the probability mass
    mass = dist.log_prob(support).exp().sum(0)
    assert torch.allclose(mass, torch.ones(2, 2, dtype=torch.float64))


def test_sparse_prior_with_dense_guide_has_infinite_kl_unless_smoothed():
    scores = _sparse_scores()
    guide = CategoricalAlignment(logits=torch.zeros_like(scores))
    assert torch.isinf(kl_divergence(guide, SparsemaxAlignment(scores=scores))).any()
    eps = 1e-3
    smoothed = SparsemaxAlignment(scores=scores, smoothing=eps)
    kl = kl_divergence(guide, smoothed)
    assert torch.isfinite(kl).all()
    assert (kl <= math.log(5 / eps) + 1e-9).all()
    expected = (1 - eps) * _sparsemax_reference(scores) + eps / 5
    assert torch.allclose(smoothed.attention, expected)


def test_sparse_guide_against_its_own_prior_has_finite_kl():
    scores = _sparse_scores()
    q = SparsemaxAlignment(scores=scores)
    p = SparsemaxAlignment(scores=scores * 0.5)
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl).all() and (kl >= -1e-12).all()


def test_sparsemax_alignment_rebuilds_from_logits_as_pyro_does():
    dist = SparsemaxAlignment(scores=_sparse_scores())
    rebuilt = SparsemaxAlignment(logits=dist.logits)
    assert torch.allclose(rebuilt.attention, dist.attention)


def test_sparsemax_alignment_with_mask_and_entmax15():
    scores = _sparse_scores()
    mask = torch.tensor([True, True, True, False, True])
    for alpha in (2.0, 1.5, 1.7):
        dist = SparsemaxAlignment(scores=scores, mask=mask, alpha=alpha)
        assert (dist.attention[..., 3] == 0).all()
        assert torch.allclose(dist.attention.sum(-1), torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [dict(smoothing=1.0), dict(alpha=1.0), dict(smoothing=-0.1)])
def test_sparsemax_alignment_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SparsemaxAlignment(scores=_sparse_scores(), **kwargs)


# --- RelaxedAlignment -------------------------------------------------------------------


def test_relaxed_samples_stay_on_the_simplex_with_padding():
    keys = 200
    logits = torch.randn(8, 16, keys)
    mask = torch.arange(keys) < torch.randint(1, keys, (8, 1, 1))
    dist = RelaxedAlignment(logits=logits, temperature=0.3, mask=mask, straight_through=False)
    sample = dist.rsample((4,))
    assert sample.shape == (4, 8, 16, keys)
    assert (sample.masked_select(~mask.expand(4, 8, 16, keys)) == 0).all()
    assert (sample.sum(-1) - 1).abs().max() <= 1e-6
    assert torch.isfinite(dist.log_prob(sample)).all()


def test_straight_through_sample_is_exactly_one_hot_with_relaxed_gradient():
    logits = torch.randn(3, 4, 6, requires_grad=True)
    dist = RelaxedAlignment(logits=logits, temperature=0.5)
    value = dist.rsample()
    assert set(value.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(value.detach().sum(-1), torch.ones(3, 4))
    (value * torch.randn(3, 4, 6)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_relaxed_log_prob_matches_pyro_without_padding():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    ours = RelaxedAlignment(logits=logits, temperature=0.7, straight_through=False)
    theirs = pyro.distributions.RelaxedOneHotCategorical(
        torch.tensor(0.7, dtype=torch.float64), logits=logits
    )
    value = theirs.sample((3,))
    assert torch.allclose(ours.log_prob(value), theirs.log_prob(value))


def test_relaxed_log_prob_on_padded_face_equals_unpadded_density():
    logits = torch.randn(4, dtype=torch.float64)
    padded = RelaxedAlignment(
        logits=torch.cat([logits, torch.zeros(2, dtype=torch.float64)]),
        temperature=0.5,
        mask=torch.tensor([True] * 4 + [False] * 2),
        straight_through=False,
    )
    plain = RelaxedAlignment(logits=logits, temperature=0.5, straight_through=False)
    value = plain.sample()
    padded_value = torch.cat([value, torch.zeros(2, dtype=torch.float64)])
    assert torch.allclose(padded.log_prob(padded_value), plain.log_prob(value))


def test_relaxed_concrete_density_integrates_to_one_for_two_keys():
    # On two keys the Concrete density is one-dimensional: integrate it numerically.
    dist = RelaxedAlignment(
        logits=torch.tensor([0.3, -0.4], dtype=torch.float64),
        temperature=0.8,
        straight_through=False,
    )
    grid = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    points = torch.stack([grid, 1 - grid], -1)
    # density w.r.t. the first coordinate on the simplex
    total = torch.trapezoid(dist.log_prob(points).exp(), grid)
    assert abs(total.item() - 1.0) < 1e-3


def test_relaxed_expand_and_categorical():
    dist = RelaxedAlignment(
        logits=torch.randn(2, 5),
        temperature=torch.tensor([0.5, 1.0]),
        mask=torch.tensor([True, True, True, True, False]),
    )
    big = dist.expand((3, 2))
    assert big.batch_shape == (3, 2) and big.event_shape == (5,)
    assert big.rsample().shape == (3, 2, 5)
    assert isinstance(dist.categorical(), CategoricalAlignment)
    assert torch.allclose(dist.categorical().attention, dist.attention)


def test_relaxed_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        RelaxedAlignment(logits=torch.randn(2, 3), temperature=0.0)


def test_every_small_alignment_is_enumerated_once():
    dist = CategoricalAlignment(logits=torch.randn(2, 3))
    support = dist.enumerate_support(expand=True)
    assert support.shape == (3, 2)
    for column in support.T:
        assert sorted(column.tolist()) == [0, 1, 2]


# --- masked keys at any score magnitude and dtype ---------------------------------------


MAGNITUDE_CASES = [
    (torch.float64, [-2e9, -3e9, 5.0]),
    (torch.float32, [-2e9, -3e9, 5.0]),
    (torch.float32, [-1e30, -3e30, 1e30]),
    (torch.float16, [-5000.0, -6000.0, 0.0]),
    (torch.bfloat16, [-1e30, -2e30, 1e30]),
    (torch.float16, [60000.0, -60000.0, 65000.0]),
]


@pytest.mark.parametrize("dtype, values", MAGNITUDE_CASES)
def test_masked_key_gets_exactly_zero_whatever_the_scores(dtype, values):
    logits = torch.tensor([values], dtype=dtype).requires_grad_()
    mask = torch.tensor([True, True, False])
    dist = CategoricalAlignment(logits=logits, mask=mask)
    assert dist.attention[0, 2] == 0
    assert torch.isclose(dist.attention[0].float().sum(), torch.tensor(1.0), atol=1e-2)
    assert (dist.sample((200,)) != 2).all()
    assert torch.isfinite(dist.entropy()).all()
    assert dist.log_prob(torch.tensor([2])).exp() == 0
    (dist.attention.float() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad[0, 2] == 0
    assert torch.isfinite(logits.grad).all()
    kl = kl_divergence(dist, CategoricalAlignment(logits=torch.zeros(1, 3, dtype=dtype), mask=mask))
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("dtype, values", MAGNITUDE_CASES)
@pytest.mark.parametrize("straight_through", [False, True])
def test_relaxed_samples_never_touch_a_masked_key_nor_give_nan(dtype, values, straight_through):
    logits = torch.tensor([values], dtype=dtype).requires_grad_()
    mask = torch.tensor([True, True, False])
    dist = RelaxedAlignment(logits, temperature=0.3, mask=mask, straight_through=straight_through)
    sample = dist.rsample((50,))
    assert not torch.isnan(sample).any()
    assert (sample[..., 2] == 0).all()
    (sample.float() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad[0, 2] == 0 and not torch.isnan(logits.grad).any()
    assert dist.attention[0, 2] == 0


def test_sparsemax_alignment_masks_at_any_magnitude():
    dist = SparsemaxAlignment(
        scores=torch.tensor([[-2e9, -3e9, 5.0]]), mask=torch.tensor([True, True, False])
    )
    assert torch.equal(dist.attention, torch.tensor([[1.0, 0.0, 0.0]]))
    assert dist.enumerate_support(expand=False).flatten().tolist() == [0]


def test_relaxed_key_mask_is_an_accessor_and_mask_is_pyros_method():
    dist = RelaxedAlignment(torch.randn(3, 4), mask=torch.tensor([True, True, False, True]))
    assert dist.key_mask.shape == (3, 4) and not dist.key_mask[:, 2].any()
    masked = dist.mask(torch.tensor([True, False, True]))
    value = dist.rsample()
    assert masked.log_prob(value)[1] == 0
    assert dist.expand((2, 3)).key_mask.shape == (2, 3, 4)


@pytest.mark.parametrize(
    "cls, kwargs, expected",
    [
        (CategoricalAlignment, dict(logits=(2, 3, 4), mask=(3, 4)), ((2, 3), ())),
        (CategoricalAlignment, dict(probs=(5, 4)), ((5,), ())),
        (SparsemaxAlignment, dict(scores=(2, 3, 4)), ((2, 3), ())),
        (SparsemaxAlignment, dict(scores=(2, 3, 4), mask=(2, 1, 4)), ((2, 3), ())),
        (RelaxedAlignment, dict(logits=(2, 3, 4), temperature=(3,)), ((2, 3), (4,))),
    ],
)
def test_infer_shapes_gives_batch_and_event_shapes(cls, kwargs, expected):
    batch, event = cls.infer_shapes(**kwargs)
    assert (tuple(batch), tuple(event)) == expected


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    values=st.lists(
        st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
        min_size=2, max_size=6,
    ),
    valid=st.lists(st.booleans(), min_size=6, max_size=6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_masked_keys_have_zero_mass_for_any_scores(values, valid, dtype):
    logits = torch.tensor(values, dtype=torch.float64)
    finfo = torch.finfo(dtype)
    logits = logits.clamp(finfo.min, finfo.max).to(dtype)
    mask = torch.tensor(valid[: len(values)])
    mask[int(torch.tensor(values).argmin())] = True  # at least one valid key, and the worst
    for dist in (
        CategoricalAlignment(logits=logits, mask=mask),
        RelaxedAlignment(logits, mask=mask, straight_through=False),
    ):
        attention = dist.attention.float()
        assert torch.isfinite(attention).all()
        assert (attention[~mask] == 0).all()
        assert abs(attention.sum().item() - 1.0) < 1e-2
    sample = RelaxedAlignment(logits, temperature=0.5, mask=mask).rsample((8,))
    assert not torch.isnan(sample).any() and (sample[:, ~mask] == 0).all()
