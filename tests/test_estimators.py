"""Plain-torch estimators: unbiased against exact enumeration, masked, shape-robust.

Draws are vectorised: a problem of batch shape ``(B, T)`` is replicated ``DRAWS`` times along a
leading batch dim, with one leaf tensor per replicate, so a single backward pass gives
``DRAWS`` independent gradient draws.  An estimator is called unbiased when, along fixed
directions of parameter space, the mean draw is within 3 standard errors (computed from the
draws) of the exact gradient.
"""

import itertools

import pytest
import torch

from structattn.distributions import CategoricalAlignment, SparsemaxAlignment
from structattn.infer import (
    AlignmentTerms,
    ExactEstimator,
    ScoreFunctionEstimator,
    SparseEstimator,
    StraightThroughEstimator,
    exact_elbo,
    gradient_variance,
    make_estimator,
)

torch.set_num_threads(1)

B, T, S = 2, 3, 4
DRAWS = 3000
F64 = torch.float64


def _problem(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "prior": scale * torch.randn(B, T, S, generator=g, dtype=F64),
        "guide": scale * torch.randn(B, T, S, generator=g, dtype=F64),
        "table": torch.randn(B, T, S, generator=g, dtype=F64) - 2.0,
        "soft": torch.randn(B, T, generator=g, dtype=F64) - 2.0,
        "features": torch.randn(B, T, 3, generator=g, dtype=F64),
        "key_mask": torch.tensor([[True, True, True, True], [True, True, False, True]])[:, None],
        "tgt_mask": torch.tensor([[True, True, True], [True, True, False]]),
    }


def _leaves(p, replicas=None):
    """Leaf tensors for prior logits, guide logits and the emission table, replicated."""
    leaves = {}
    for name in ("prior", "guide", "table"):
        value = p[name] if replicas is None else p[name].expand(replicas, *p[name].shape)
        leaves[name] = value.clone().requires_grad_()
    return leaves


def _pick(table, z):
    """``table[..., z]`` for integer keys ``z`` (broadcast) or one-hot weights ``z (..., S)``."""
    if z.is_floating_point():
        return (z * table).sum(-1)
    shape = torch.broadcast_shapes(z.shape, table.shape[:-1])
    return table.expand(shape + table.shape[-1:]).gather(-1, z.expand(shape).unsqueeze(-1))[..., 0]


def _expand(tensor, replicas):
    return tensor if replicas is None else tensor.expand(replicas, *tensor.shape)


def _terms_and_guide(p, leaves, replicas=None, use_guide=True, callable_lik=True):
    key_mask = p["key_mask"]
    prior = CategoricalAlignment(logits=leaves["prior"], mask=key_mask)
    guide = CategoricalAlignment(logits=leaves["guide"], mask=key_mask) if use_guide else None
    table = leaves["table"]

    def log_lik(z):
        # a nonlinear function of the parameters, evaluated only at z
        picked = _pick(table, z)
        return picked - 0.1 * picked**2

    terms = AlignmentTerms(
        prior,
        log_lik if callable_lik else table - 0.1 * table**2,
        _expand(p["tgt_mask"], replicas),
        _expand(p["soft"], replicas),
        _expand(p["features"], replicas),
    )
    return terms, guide


def _exact_gradient(p, use_guide):
    leaves = _leaves(p)
    terms, guide = _terms_and_guide(p, leaves, use_guide=use_guide, callable_lik=False)
    if use_guide:
        loss = ExactEstimator().loss(terms, guide)
    else:
        # the bound E_p[log p(y | z)] of sampling without a guide
        table = terms.log_likelihood
        loss = -(terms.prior.probs * table).sum(-1).masked_fill(~p["tgt_mask"], 0).sum()
    return _flat(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), leaves, ())


def _draw_gradients(p, estimator, use_guide=True):
    leaves = _leaves(p, DRAWS)
    terms, guide = _terms_and_guide(p, leaves, DRAWS, use_guide)
    loss = estimator.loss(terms, guide)
    return _flat(
        torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), leaves, (DRAWS,)
    )


def _flat(grads, leaves, leading):
    """Concatenate gradients (zeros for unused leaves) to ``leading + (P,)``."""
    parts = [
        torch.zeros_like(leaf) if grad is None else grad
        for grad, leaf in zip(grads, leaves.values(), strict=True)
    ]
    return torch.cat([part.reshape(leading + (-1,)) for part in parts], -1)


def _assert_unbiased(draws, exact):
    """Mean within 3 standard errors of the exact gradient along fixed directions."""
    g = torch.Generator().manual_seed(7)
    directions = [exact / exact.norm()] + [
        torch.randn(exact.shape, generator=g, dtype=F64) for _ in range(3)
    ]
    for direction in directions:
        projected = draws @ direction
        error = abs(float(projected.mean() - exact @ direction))
        standard_error = float(projected.std() / DRAWS**0.5)
        assert error < 3 * standard_error + 1e-12, (error, standard_error)


UNBIASED = {
    "no baseline, analytic KL": lambda: ScoreFunctionEstimator("none"),
    "no baseline, sampled KL": lambda: ScoreFunctionEstimator("none", kl="sampled"),
    "soft-attention baseline": lambda: ScoreFunctionEstimator("soft"),
    "learned baseline": lambda: ScoreFunctionEstimator("learned", in_features=3).double(),
    "RLOO K=2": lambda: ScoreFunctionEstimator("loo", num_samples=2),
    "RLOO K=4, sampled KL": lambda: make_estimator("rloo", num_samples=4, kl="sampled"),
    "3 samples, no baseline": lambda: ScoreFunctionEstimator("none", num_samples=3),
}


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_score_function_estimators_are_unbiased_for_the_exact_elbo(name):
    p = _problem()
    _assert_unbiased(_draw_gradients(p, UNBIASED[name]()), _exact_gradient(p, True))


def test_running_mean_baseline_is_unbiased_after_warm_up():
    p = _problem()
    estimator = ScoreFunctionEstimator("mean")
    for seed in (1, 2):  # history from other problems: a stale, off-target baseline
        other = _problem(seed)
        terms, guide = _terms_and_guide(other, _leaves(other, 4), 4)
        estimator.loss(terms, guide)
    assert float(estimator.baseline.mean) != 0.0
    _assert_unbiased(_draw_gradients(p, estimator), _exact_gradient(p, True))


@pytest.mark.parametrize("baseline, samples", [("none", 1), ("loo", 4)])
def test_sampling_from_the_prior_is_unbiased_for_the_hard_attention_bound(baseline, samples):
    p = _problem()
    estimator = ScoreFunctionEstimator(baseline, num_samples=samples)
    _assert_unbiased(_draw_gradients(p, estimator, use_guide=False), _exact_gradient(p, False))


def test_straight_through_is_reported_biased():
    p = _problem(scale=3.0)
    draws = _draw_gradients(p, StraightThroughEstimator(temperature=1.0))
    exact = _exact_gradient(p, True)
    mean = draws.mean(0)
    floor = (draws.var(0).sum() / DRAWS) ** 0.5
    assert float((mean - exact).norm()) > 5 * float(floor)


def test_rloo_with_four_samples_has_lower_variance_than_no_baseline():
    p = _problem()
    plain = _draw_gradients(p, ScoreFunctionEstimator("none")).var(0).sum()
    rloo = _draw_gradients(p, ScoreFunctionEstimator("loo", num_samples=4)).var(0).sum()
    assert rloo < 0.5 * plain


def _masked_query_gradients(estimator, p, use_guide=True, sparse=False):
    leaves = _leaves(p, 8)
    terms, guide = _terms_and_guide(p, leaves, 8, use_guide)
    if sparse:
        terms.prior = SparsemaxAlignment(scores=leaves["prior"] * 3, mask=p["key_mask"])
    estimator.loss(terms, guide).backward()
    masked = ~p["tgt_mask"]
    return [leaf.grad[:, masked] for leaf in leaves.values() if leaf.grad is not None]


ALL_ESTIMATORS = {
    "enum": lambda: ExactEstimator(),
    "none": lambda: ScoreFunctionEstimator("none"),
    "mean": lambda: ScoreFunctionEstimator("mean"),
    "learned": lambda: ScoreFunctionEstimator("learned", in_features=3).double(),
    "soft": lambda: ScoreFunctionEstimator("soft"),
    "loo": lambda: ScoreFunctionEstimator("loo", num_samples=3),
    "sampled-kl": lambda: ScoreFunctionEstimator("loo", num_samples=2, kl="sampled"),
    "st": lambda: StraightThroughEstimator(0.5),
}


@pytest.mark.parametrize("name", sorted(ALL_ESTIMATORS))
def test_masked_queries_contribute_exactly_zero_gradient(name):
    p = _problem()
    estimator = ALL_ESTIMATORS[name]()
    if name == "mean":  # a non-zero running mean, as after training
        estimator.loss(*_terms_and_guide(p, _leaves(p, 8), 8))
        estimator.loss(*_terms_and_guide(p, _leaves(p, 8), 8))
    for use_guide in (True, False):
        if name == "soft" and not use_guide:
            continue
        for grad in _masked_query_gradients(estimator, p, use_guide):
            assert (grad == 0).all()


def test_masked_queries_contribute_zero_gradient_to_sparse_marginalization():
    p = _problem()
    for grad in _masked_query_gradients(SparseEstimator(), p, use_guide=False, sparse=True):
        assert (grad == 0).all()


@pytest.mark.parametrize("name", sorted(ALL_ESTIMATORS))
def test_changing_batch_and_length_between_calls_does_not_crash(name):
    estimator = ALL_ESTIMATORS[name]()
    for batch, length, keys in [(3, 4, 5), (5, 2, 5), (2, 7, 3), (1, 1, 2)]:
        g = torch.Generator().manual_seed(batch)
        prior = CategoricalAlignment(
            logits=torch.randn(batch, length, keys, generator=g, dtype=F64)
        )
        guide = CategoricalAlignment(
            logits=torch.randn(batch, length, keys, generator=g, dtype=F64, requires_grad=True)
        )
        mask = torch.rand(batch, length, generator=g) < 0.8
        terms = AlignmentTerms(
            prior,
            torch.randn(batch, length, keys, generator=g, dtype=F64),
            mask,
            torch.randn(batch, length, dtype=F64),
            torch.randn(batch, length, 3, dtype=F64),
        )
        loss = estimator.loss(terms, guide)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()


def test_surrogate_value_is_the_objective_estimate():
    p = _problem()
    leaves = _leaves(p, DRAWS)
    terms, guide = _terms_and_guide(p, leaves, DRAWS)
    for estimator in (
        ScoreFunctionEstimator("loo", num_samples=2),
        ScoreFunctionEstimator("learned", in_features=3).double(),
    ):
        value = -float(estimator.loss(terms, guide).detach()) / DRAWS
        exact_terms, exact_guide = _terms_and_guide(p, _leaves(p), callable_lik=False)
        exact = -float(ExactEstimator().loss(exact_terms, exact_guide).detach())
        assert abs(value - exact) < 0.1, (value, exact)


def test_exact_estimator_accepts_a_callable_and_matches_exact_elbo():
    p = _problem()
    leaves = _leaves(p)
    terms, guide = _terms_and_guide(p, leaves)
    table = leaves["table"] - 0.1 * leaves["table"] ** 2
    expected = exact_elbo(guide, terms.prior, table, p["tgt_mask"]).sum()
    assert torch.allclose(-ExactEstimator().loss(terms, guide), expected)


def _sparse_problem(seed=0):
    p = _problem(seed, scale=3.0)
    leaves = _leaves(p)
    prior = SparsemaxAlignment(scores=leaves["prior"], mask=p["key_mask"])
    table = leaves["table"]
    calls = []

    def log_lik(z):
        calls.append(z.shape[0])
        picked = _pick(table, z)
        return picked - 0.1 * picked**2

    return p, leaves, prior, log_lik, calls


def test_sparse_marginal_likelihood_and_gradient_equal_full_enumeration():
    p, leaves, prior, log_lik, calls = _sparse_problem()
    estimator = SparseEstimator()
    loss = estimator.loss(AlignmentTerms(prior, log_lik, p["tgt_mask"]))
    assert calls == [estimator.stats["evaluations_per_query"]] and calls[0] < S
    full = ExactEstimator().loss(AlignmentTerms(prior, log_lik, p["tgt_mask"]))
    assert torch.allclose(loss, full)
    params = list(leaves.values())
    sparse_grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    for a, b in zip(sparse_grads, full_grads, strict=True):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            assert torch.allclose(a, b)


def test_sparse_elbo_with_a_sparse_guide_is_the_exact_elbo():
    p, leaves, prior, log_lik, _ = _sparse_problem()
    smooth_prior = SparsemaxAlignment(scores=leaves["prior"], mask=p["key_mask"], smoothing=0.1)
    guide = SparsemaxAlignment(scores=leaves["guide"] * 3, mask=p["key_mask"])
    loss = SparseEstimator().loss(AlignmentTerms(smooth_prior, log_lik, p["tgt_mask"]), guide)
    table = leaves["table"] - 0.1 * leaves["table"] ** 2
    expected = exact_elbo(guide, smooth_prior, table, p["tgt_mask"]).sum()
    assert torch.allclose(-loss, expected)


def test_sparse_elbo_is_minus_infinity_when_the_guide_leaves_the_prior_support():
    p, leaves, prior, log_lik, _ = _sparse_problem()
    dense_guide = CategoricalAlignment(logits=leaves["guide"], mask=p["key_mask"])
    loss = SparseEstimator().loss(AlignmentTerms(prior, log_lik, p["tgt_mask"]), dense_guide)
    assert loss == float("inf")


def test_gradient_variance_reports_zero_for_exact_and_a_floor_for_sampling():
    p = _problem()
    leaves = _leaves(p)
    params = [leaves["guide"]]

    def loss(estimator):
        return lambda: estimator.loss(*_terms_and_guide(p, leaves))

    exact = loss(ExactEstimator())
    report = gradient_variance(exact, exact, params, num_draws=3)
    assert report.relative_variance == 0 and report.relative_bias < 1e-12
    sampled = gradient_variance(loss(ScoreFunctionEstimator("none")), exact, params, 200)
    assert sampled.relative_variance > 0
    assert sampled.relative_bias < 3 * sampled.noise_floor


def test_learned_baseline_parameters_are_named_baseline_and_train():
    estimator = ScoreFunctionEstimator("learned", in_features=3).double()
    names = [name for name, _ in estimator.named_parameters()]
    assert names and all(name.startswith("baseline.") for name in names)
    p = _problem()
    estimator.loss(*_terms_and_guide(p, _leaves(p, 16), 16)).backward()
    assert all(
        param.grad is not None and param.grad.abs().sum() > 0 for param in estimator.parameters()
    )


def test_estimator_call_takes_model_guide_and_batch():
    p = _problem()
    leaves = _leaves(p)

    def model(batch):
        return _terms_and_guide(batch, leaves)[0]

    def guide(batch):
        return _terms_and_guide(batch, leaves)[1]

    estimator = ExactEstimator()
    assert torch.equal(estimator(model, guide, p), estimator.loss(model(p), guide(p)))


def test_score_function_and_rloo_are_unbiased_for_a_linear_chain_crf():
    """A structured site (event shape (N,)); the exact gradient by brute force over paths."""
    from structattn.distributions.chain import LinearChainCRF

    g = torch.Generator().manual_seed(0)
    batch, num, states = 2, 3, 3
    guide_potentials = torch.randn(batch, num - 1, states, states, generator=g, dtype=F64)
    prior_potentials = torch.randn(batch, num - 1, states, states, generator=g, dtype=F64)
    weights = torch.randn(num, states, generator=g, dtype=F64)

    def log_lik(z):
        per_position = weights.expand(z.shape + (states,)).gather(-1, z.unsqueeze(-1))
        return -(per_position.squeeze(-1).sum(-1) ** 2) / 4

    paths = torch.tensor(list(itertools.product(range(states), repeat=num)))[:, None, :]
    paths = paths.expand(-1, batch, num)
    exact_leaf = guide_potentials.clone().requires_grad_()
    q = LinearChainCRF(exact_leaf)
    p = LinearChainCRF(prior_potentials)
    objective = (q.log_prob(paths).exp() * log_lik(paths)).sum() - (q.kl_divergence(p)).sum()
    (exact,) = torch.autograd.grad(-objective, exact_leaf)
    for estimator in (ScoreFunctionEstimator("none"), ScoreFunctionEstimator("loo", num_samples=4)):
        leaf = guide_potentials.expand(DRAWS, *guide_potentials.shape).clone().requires_grad_()
        prior = LinearChainCRF(prior_potentials.expand(DRAWS, *prior_potentials.shape))
        loss = estimator.loss(AlignmentTerms(prior, log_lik), LinearChainCRF(leaf))
        (draws,) = torch.autograd.grad(loss, leaf)
        _assert_unbiased(draws.reshape(DRAWS, -1), exact.reshape(-1))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_estimator("magic"), "name"),
        (lambda: ScoreFunctionEstimator("none", num_samples=0), "num_samples"),
        (lambda: ScoreFunctionEstimator("loo", num_samples=1), "num_samples"),
        (lambda: ScoreFunctionEstimator("oracle"), "baseline"),
        (lambda: ScoreFunctionEstimator(kl="relaxed"), "kl"),
        (lambda: StraightThroughEstimator(temperature=0.0), "temperature"),
        (lambda: make_estimator("rloo", baseline="mean"), "baseline"),
    ],
)
def test_bad_settings_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs_raise_value_error_naming_the_argument():
    p = _problem()
    leaves = _leaves(p)
    terms, guide = _terms_and_guide(p, leaves)
    with pytest.raises(ValueError, match="mask"):
        ScoreFunctionEstimator().loss(
            AlignmentTerms(terms.prior, terms.log_likelihood, p["tgt_mask"][:, :2]), guide
        )
    with pytest.raises(ValueError, match="features"):
        ScoreFunctionEstimator("learned", in_features=3).double().loss(
            AlignmentTerms(terms.prior, terms.log_likelihood), guide
        )
    with pytest.raises(ValueError, match="soft_log_likelihood"):
        ScoreFunctionEstimator("soft").loss(
            AlignmentTerms(terms.prior, terms.log_likelihood), guide
        )
    with pytest.raises(ValueError, match="log_likelihood"):
        ScoreFunctionEstimator().loss(AlignmentTerms(terms.prior, lambda z: torch.zeros(5)), guide)
    with pytest.raises(ValueError, match="log_likelihood"):
        ExactEstimator().loss(AlignmentTerms(terms.prior, torch.zeros(B, T, S + 1)), guide)


# ----------------------------------------------------------------------------------------
# Padded queries: -inf / NaN in the log-likelihood never leaks (issue 9, item 4)
# ----------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from structattn.infer import (  # noqa: E402
    ESTIMATOR_NAMES,
    ESTIMATORS,
    RLOOEstimator,
    make_baseline,
    marginal_log_likelihood,
    posterior,
    register_baseline,
    register_estimator,
)
from structattn.infer.baselines import BASELINES, Baseline  # noqa: E402


def _padded_problem(name, seed, batch, length, keys, poison, use_guide, callable_lik, dtype):
    """Leaves, terms and guide with ``poison`` (-inf or NaN) at every padded query's table."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length - 1 if length > 1 else 1  # at least one padded query when possible
    tgt_mask = torch.arange(length) < lengths[:, None]
    leaves = {
        name_: torch.randn(batch, length, keys, generator=g, dtype=dtype).requires_grad_()
        for name_ in ("prior", "guide", "table")
    }
    sparse = issubclass(ESTIMATORS[name], SparseEstimator)
    if sparse:
        prior = SparsemaxAlignment(scores=3 * leaves["prior"], smoothing=0.1 if use_guide else 0.0)
        guide = SparsemaxAlignment(scores=3 * leaves["guide"]) if use_guide else None
    else:
        prior = CategoricalAlignment(logits=leaves["prior"])
        guide = CategoricalAlignment(logits=leaves["guide"]) if use_guide else None
    poisoned = torch.where(tgt_mask[..., None], leaves["table"], poison)

    def log_lik(z):
        return _pick(poisoned, z)

    soft = torch.randn(batch, length, generator=g, dtype=dtype)
    features = torch.randn(batch, length, 3, generator=g, dtype=dtype)
    terms = AlignmentTerms(
        prior,
        log_lik if callable_lik else poisoned,
        tgt_mask,
        torch.where(tgt_mask, soft, poison),
        torch.where(tgt_mask[..., None], features, poison),
    )
    return leaves, terms, guide


_BASELINE_OPTIONS = {"learned": {"in_features": 3}, "loo": {"num_samples": 2}}


def _instances(name, dtype):
    """One estimator per setting that changes the math: for ``score``, every baseline."""
    if name != "score":
        return [make_estimator(name)]
    return [
        make_estimator(name, baseline=baseline, **_BASELINE_OPTIONS.get(baseline, {})).to(dtype)
        for baseline in sorted(BASELINES)
    ]


def _build(name, dtype):
    return _instances(name, dtype)[0]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    length=st.integers(2, 4),
    keys=st.integers(2, 5),
    poison=st.sampled_from([float("-inf"), float("nan")]),
    use_guide=st.booleans(),
    callable_lik=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_every_estimator_is_finite_in_value_and_gradient_with_poisoned_padded_queries(
    seed, batch, length, keys, poison, use_guide, callable_lik, dtype
):
    for name in sorted(ESTIMATOR_NAMES):
        for estimator in _instances(name, dtype):
            leaves, terms, guide = _padded_problem(
                name, seed, batch, length, keys, poison, use_guide, callable_lik, dtype
            )
            loss = estimator.loss(terms, guide)
            assert torch.isfinite(loss), name
            params = list(leaves.values()) + list(estimator.parameters())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for grad in grads[len(leaves):]:  # the learned baseline's own parameters
                assert grad is None or torch.isfinite(grad).all(), name
            grads = grads[: len(leaves)]
            for leaf_name, grad in zip(leaves, grads, strict=True):
                assert grad is None or torch.isfinite(grad).all(), (name, leaf_name)
                if grad is not None:
                    # padded queries contribute exactly nothing
                    assert (grad[~terms.mask] == 0).all(), (name, leaf_name)


@pytest.mark.parametrize("name", sorted(ESTIMATOR_NAMES))
@pytest.mark.parametrize("callable_lik", [False, True])
def test_nan_at_a_real_query_raises_value_error_naming_the_log_likelihood(name, callable_lik):
    leaves, terms, guide = _padded_problem(
        name, 0, 2, 3, 4, float("-inf"), False, callable_lik, torch.float64
    )
    table = leaves["table"].detach().clone()
    table[0, 0] = float("nan")  # query (0, 0) is real; every key, so every sample meets it
    mask = terms.mask
    terms.log_likelihood = (lambda z: _pick(table, z)) if callable_lik else table
    assert mask[0, 0]
    with pytest.raises(ValueError, match="log_likelihood"):
        _build(name, torch.float64).loss(terms, guide)


# ----------------------------------------------------------------------------------------
# One registry of estimator names, extensible from user code
# ----------------------------------------------------------------------------------------
def test_one_list_of_estimator_names_serves_make_estimator_and_sample_alignment():
    from structattn.infer import sample_alignment

    assert set(ESTIMATOR_NAMES) == {"enum", "score", "rloo", "st", "sparse"}
    for name in ESTIMATOR_NAMES:
        assert isinstance(make_estimator(name), ESTIMATORS[name])
    prior = CategoricalAlignment(logits=torch.randn(2, 3))
    for name in ("magic", ["enum"]):
        with pytest.raises(ValueError, match="estimator"):
            sample_alignment("z", prior, estimator=name)


def test_a_user_registered_estimator_and_baseline_work_like_built_ins():
    from structattn.infer import sample_alignment

    @register_baseline("constant-test")
    class ConstantBaseline(Baseline):
        def __init__(self, value: float = 0.0) -> None:
            super().__init__()
            self.value = value

        def forward(self, reward, mask=None, soft_log_likelihood=None, features=None):
            return reward.new_full((), self.value)

    @register_estimator("greedy-test")
    class GreedyEstimator(ExactEstimator):
        """The exact objective, registered under another name."""

    try:
        assert "greedy-test" in ESTIMATOR_NAMES
        p = _problem()
        leaves = _leaves(p)
        terms, guide = _terms_and_guide(p, leaves, callable_lik=False)
        assert torch.equal(make_estimator("greedy-test").loss(terms, guide),
                           ExactEstimator().loss(terms, guide))
        estimator = make_estimator("score", baseline="constant-test", value=-2.0)
        assert isinstance(estimator.baseline, ConstantBaseline)
        assert torch.isfinite(estimator.loss(terms, guide))
        prior = CategoricalAlignment(logits=torch.randn(2, 3))
        import pyro.poutine as poutine

        trace = poutine.trace(
            lambda: sample_alignment("z", prior, estimator="greedy-test")
        ).get_trace()
        assert trace.nodes["z"]["infer"]["enumerate"] == "parallel"
    finally:
        ESTIMATORS.pop("greedy-test")
        BASELINES.pop("constant-test")


# ----------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument (issue 9, item 11)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_estimator("enum", temperature=1.0), "temperature"),
        (lambda: make_estimator("sparse", num_samples=2), "num_samples"),
        (lambda: make_estimator(None), "name"),
        (lambda: make_estimator(["enum"]), "name"),
        (lambda: make_estimator("rloo", num_samples=1), "num_samples"),
        (lambda: make_estimator("rloo", num_samples=2.0), "num_samples"),
        (lambda: make_estimator("st", temperature=None), "temperature"),
        (lambda: make_estimator("st", temperature="1.0"), "temperature"),
        (lambda: make_estimator("st", temperature=float("nan")), "temperature"),
        (lambda: make_estimator("st", num_samples=True), "num_samples"),
        (lambda: make_estimator("score", temperature=1.0), "temperature"),
        (lambda: make_estimator("score", kl=None), "kl"),
        (lambda: make_estimator("score", num_samples=None), "num_samples"),
        (lambda: make_estimator("score", baseline="learned"), "in_features"),
        (lambda: make_estimator("score", baseline="learned", in_features=2.5), "in_features"),
        (lambda: make_estimator("score", baseline="learned", in_features=2, hidden=0), "hidden"),
        (lambda: make_estimator("score", baseline="mean", beta="0.5"), "beta"),
        (lambda: make_estimator("score", baseline="mean", beta=1.0), "beta"),
        (lambda: make_estimator("score", baseline="soft", offset=None), "offset"),
        (lambda: make_estimator("score", baseline=3), "baseline"),
        (lambda: make_baseline("loo", beta=0.5), "beta"),
        (lambda: make_baseline(make_baseline("none"), beta=0.5), "beta"),
        (lambda: RLOOEstimator(kl="relaxed"), "kl"),
        (lambda: gradient_variance(lambda: torch.zeros(()), torch.zeros(1),
                                   [torch.zeros(1, requires_grad=True)], num_draws=1.5),
         "num_draws"),
        (lambda: gradient_variance(None, torch.zeros(1), [torch.zeros(1, requires_grad=True)]),
         "estimate"),
        (lambda: gradient_variance(lambda: torch.zeros(()), torch.zeros(1), [1.0]),
         "parameters"),
        (lambda: ExactEstimator().loss(AlignmentTerms(torch.zeros(2, 3), torch.zeros(2, 3))),
         "prior"),
        (lambda: ExactEstimator().loss(
            AlignmentTerms(CategoricalAlignment(logits=torch.zeros(2, 3)), None)),
         "log_likelihood"),
    ],
)
def test_bad_estimator_and_baseline_arguments_raise_value_error_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ----------------------------------------------------------------------------------------
# Exact marginal likelihood and posterior for every alignment family (issue 8, item 2)
# ----------------------------------------------------------------------------------------
def _brute_force(prior, table, support):
    """``log p(y | x)`` and posterior marginals by enumerating ``support (K, N)``."""
    values = support[:, None, :].expand(-1, table.shape[0], -1)  # (K, B, N)
    log_joint = prior.log_prob(values)
    picked = table.unsqueeze(0).expand(values.shape + table.shape[-1:])
    log_joint = log_joint + picked.gather(-1, values.unsqueeze(-1)).squeeze(-1).sum(-1)
    log_marginal = log_joint.logsumexp(0)
    weights = (log_joint - log_marginal).exp()  # (K, B)
    one_hot = torch.nn.functional.one_hot(values, table.shape[-1]).to(table.dtype)
    return log_marginal, (weights[..., None, None] * one_hot).sum(0)


def _tolerance(dtype, scale):
    return (1e-9 if dtype == F64 else 2e-4) * max(1.0, scale)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_chain_marginal_likelihood_and_posterior_match_brute_force(dtype, scale):
    from structattn.distributions import LinearChainCRF

    g = torch.Generator().manual_seed(int(scale))
    batch, num, states = 2, 4, 3
    prior = LinearChainCRF(
        scale * torch.randn(batch, num - 1, states, states, generator=g, dtype=F64).to(dtype),
        initial_potentials=scale * torch.randn(batch, states, generator=g, dtype=F64).to(dtype),
    )
    table = (scale * torch.randn(batch, num, states, generator=g, dtype=F64)).to(dtype)
    support = torch.tensor(list(itertools.product(range(states), repeat=num)))
    exact_ll, exact_post = _brute_force(
        LinearChainCRF(prior.log_potentials.double(),
                       initial_potentials=prior.initial_potentials.double()),
        table.double(), support,
    )
    tol = _tolerance(dtype, scale)
    assert torch.allclose(marginal_log_likelihood(prior, table).double(), exact_ll,
                          atol=tol, rtol=tol)
    assert torch.allclose(posterior(prior, table).double(), exact_post, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_monotonic_marginal_likelihood_and_posterior_match_brute_force(dtype, scale):
    from structattn.distributions import MonotonicAlignment

    g = torch.Generator().manual_seed(int(scale) + 1)
    batch, targets, sources = 2, 3, 4
    logits = scale * torch.randn(batch, targets, sources, generator=g, dtype=F64)
    table = scale * torch.randn(batch, targets, sources, generator=g, dtype=F64)
    prior = MonotonicAlignment(logits.to(dtype), max_jump=2)
    support = torch.tensor(
        [z for z in itertools.product(range(sources), repeat=targets)
         if z[0] <= 2 and all(0 <= b - a <= 2 for a, b in zip(z, z[1:], strict=False))]
    )
    exact_ll, exact_post = _brute_force(MonotonicAlignment(logits, max_jump=2), table, support)
    tol = _tolerance(dtype, scale)
    assert torch.allclose(marginal_log_likelihood(prior, table.to(dtype)).double(), exact_ll,
                          atol=tol, rtol=tol)
    assert torch.allclose(posterior(prior, table.to(dtype)).double(), exact_post, atol=tol * 10)


@pytest.mark.parametrize("multiroot", [False, True])
@pytest.mark.parametrize("projective", [False, True])
def test_dependency_crf_marginal_likelihood_matches_brute_force(projective, multiroot):
    """A table ``(dependent, head)`` is arc-factored: brute force over every head sequence,
    keeping only trees (and, for the projective CRF, non-crossing ones)."""
    from structattn.distributions import NonProjectiveDependencyCRF, ProjectiveDependencyCRF

    g = torch.Generator().manual_seed(3)
    words = 4
    arcs = torch.randn(1, words, words, generator=g, dtype=F64)
    table = torch.randn(1, words, words, generator=g, dtype=F64)  # [dependent, head]
    cls = ProjectiveDependencyCRF if projective else NonProjectiveDependencyCRF
    prior = cls(arcs, multiroot=multiroot)

    def is_tree(heads):  # heads[d] == d: attached to the root
        roots = [d for d in range(words) if heads[d] == d]
        if not roots or (not multiroot and len(roots) > 1):
            return False
        for d in range(words):
            seen, node = set(), d
            while heads[node] != node:
                if node in seen:
                    return False
                seen.add(node)
                node = heads[node]
        if projective:
            spans = [(min(d, h), max(d, h)) for d, h in enumerate(heads) if d != h]
            spans += [(-1, r) for r in roots]  # the root sits left of every word
            for a, b in spans:
                for c, d in spans:
                    if a < c < b < d:
                        return False
        return True

    trees = [h for h in itertools.product(range(words), repeat=words) if is_tree(h)]
    scores = torch.stack([
        sum(arcs[0, h, d] + table[0, d, h] for d, h in enumerate(heads)) for heads in trees
    ])
    base = torch.stack([sum(arcs[0, h, d] for d, h in enumerate(heads)) for heads in trees])
    expected = scores.logsumexp(0) - base.logsumexp(0)
    assert torch.allclose(marginal_log_likelihood(prior, table), expected.reshape(1), atol=1e-8)
    posterior_weights = (scores - scores.logsumexp(0)).exp()
    expected_post = torch.zeros(words, words, dtype=F64)
    for weight, heads in zip(posterior_weights, trees, strict=True):
        for d, h in enumerate(heads):
            expected_post[d, h] += weight
    assert torch.allclose(posterior(prior, table)[0], expected_post, atol=1e-8)


def test_categorical_marginal_likelihood_and_posterior_sum_over_keys():
    p = _problem()
    prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
    joint = prior.logits + p["table"]
    assert torch.allclose(marginal_log_likelihood(prior, p["table"]), joint.logsumexp(-1))
    assert torch.allclose(posterior(prior, p["table"]), joint.softmax(-1))
    sparse = SparsemaxAlignment(scores=3 * p["prior"])
    support = sparse.probs > 0
    expected = torch.where(support, sparse.probs.log() + p["table"], -torch.inf).logsumexp(-1)
    assert torch.allclose(marginal_log_likelihood(sparse, p["table"]), expected)


def test_exact_helpers_name_a_distribution_they_do_not_define():
    from structattn.distributions import RelaxedAlignment

    relaxed = RelaxedAlignment(logits=torch.randn(2, 3, 4), temperature=1.0)
    for helper in (marginal_log_likelihood, posterior):
        with pytest.raises(ValueError, match="RelaxedAlignment"):
            helper(relaxed, torch.zeros(2, 3, 4))
    prior = CategoricalAlignment(logits=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="emission_log_prob"):
        marginal_log_likelihood(prior, torch.zeros(2, 3, 5))


def test_exact_estimator_sums_out_a_structured_prior_through_its_dynamic_program():
    from structattn.distributions import LinearChainCRF

    g = torch.Generator().manual_seed(5)
    batch, num, states = 2, 3, 3
    potentials = torch.randn(batch, num - 1, states, states, generator=g, dtype=F64)
    table = torch.randn(batch, num, states, generator=g, dtype=F64)
    prior = LinearChainCRF(potentials)
    support = torch.tensor(list(itertools.product(range(states), repeat=num)))
    expected, _ = _brute_force(prior, table, support)
    loss = ExactEstimator().loss(AlignmentTerms(prior, table))
    assert torch.allclose(-loss, expected.sum())
    mask = torch.tensor([True, False])
    poisoned = table.clone()
    poisoned[1] = float("nan")
    loss = ExactEstimator().loss(AlignmentTerms(prior, poisoned, mask))
    assert torch.allclose(-loss, expected[0])
