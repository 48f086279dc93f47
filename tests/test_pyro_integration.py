"""Alignment distributions inside Pyro models and guides, under every ELBO.

The toy model: per (batch, query) an alignment z picks one of S source vectors; the observed
token y is emitted from the chosen vector.  Batch size equals the number of queries (B == T)
on purpose: naive batch indexing of enumerated values is silently wrong exactly there.
"""

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer import (
    SVI,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    config_enumerate,
    infer_discrete,
)
from pyro.optim import Adam

from structattn.distributions import CategoricalAlignment, RelaxedAlignment, SparsemaxAlignment
from structattn.infer import (
    exact_elbo,
    gather,
    marginal_log_likelihood,
    posterior,
    sample_alignment,
)

torch.set_num_threads(1)

B, T, S, H, V = 3, 3, 4, 5, 6


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    out = torch.randn(H, V, generator=g, dtype=torch.float64)
    prior_scores = torch.randn(B, T, S, generator=g, dtype=torch.float64)
    guide_scores = torch.randn(B, T, S, generator=g, dtype=torch.float64)
    y = torch.randint(V, (B, T), generator=g)
    key_mask = (torch.arange(S) < torch.tensor([S, S - 1, 2])[:, None])[:, None, :]
    tgt_mask = torch.arange(T) < torch.tensor([T, T, T - 1])[:, None]
    return dict(
        enc=enc,
        out=out,
        prior=prior_scores,
        guide=guide_scores,
        y=y,
        key_mask=key_mask,
        tgt_mask=tgt_mask,
    )


def _emission_log_prob(p):
    """log p(y_bt | z_bt = k) for every k: (B, T, S)."""
    logp = (p["enc"] @ p["out"]).log_softmax(-1)  # (B, S, V)
    return logp.gather(-1, p["y"][:, None, :].expand(B, S, T)).transpose(-1, -2)


def _model(p, estimator, dist_cls=CategoricalAlignment):
    def model():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            if dist_cls is RelaxedAlignment:
                prior = RelaxedAlignment(logits=p["prior"], temperature=0.5, mask=p["key_mask"])
            else:
                prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
            z = sample_alignment("z", prior, estimator=estimator, mask=p["tgt_mask"])
            ctx = gather(p["enc"], z)
            with pyro.poutine.mask(mask=p["tgt_mask"]):
                pyro.sample("y", pdist.Categorical(logits=ctx @ p["out"]), obs=p["y"])

    return model


def _guide(p, estimator, dist_cls=CategoricalAlignment, scores=None):
    def guide():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            logits = p["guide"] if scores is None else scores
            if dist_cls is RelaxedAlignment:
                q = RelaxedAlignment(logits=logits, temperature=0.5, mask=p["key_mask"])
            else:
                q = CategoricalAlignment(logits=logits, mask=p["key_mask"])
            sample_alignment("z", q, estimator=estimator, mask=p["tgt_mask"])

    return guide


def _posterior(p):
    """p(z | x, y) at observed queries; the prior at padded queries (their y is masked out)."""
    prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
    emission = _emission_log_prob(p) * p["tgt_mask"][..., None]
    return posterior(prior, emission)


def _hand_exact_elbo(p):
    q = CategoricalAlignment(logits=p["guide"], mask=p["key_mask"])
    prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
    return exact_elbo(q, prior, _emission_log_prob(p), mask=p["tgt_mask"]).sum()


def test_guide_side_enumeration_gives_the_hand_computed_exact_elbo():
    p = _problem()
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    loss = elbo.loss(_model(p, None), _guide(p, "enum"))
    assert abs(-loss - _hand_exact_elbo(p).item()) < 1e-9


def test_model_side_enumeration_gives_the_exact_marginal_likelihood():
    p = _problem()
    prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
    expected = marginal_log_likelihood(prior, _emission_log_prob(p), mask=p["tgt_mask"]).sum()
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(_model(p, "enum"), lambda: None)
    assert abs(-loss - expected.item()) < 1e-9


def test_exact_elbo_gradient_matches_pyro():
    p = _problem()
    scores = p["guide"].clone().requires_grad_()
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        _model(p, None), _guide(p, "enum", scores=scores)
    )
    (grad_pyro,) = torch.autograd.grad(loss, scores)
    q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
    prior = CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])
    hand = -exact_elbo(q, prior, _emission_log_prob(p), mask=p["tgt_mask"]).sum()
    (grad_hand,) = torch.autograd.grad(hand, scores)
    assert torch.allclose(grad_pyro, grad_hand)


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceGraph_ELBO])
def test_score_function_elbos_are_unbiased_estimates_of_the_exact_elbo(elbo_cls):
    p = _problem()
    particles = 4000
    elbo = elbo_cls(num_particles=particles, vectorize_particles=True, max_plate_nesting=2)
    estimate = -elbo.loss(_model(p, None), _guide(p, "score"))
    exact = _hand_exact_elbo(p).item()
    # Monte Carlo error of the mean over particles (per-particle std is a few nats here)
    assert abs(estimate - exact) < 0.5, (estimate, exact)


def test_score_function_site_trains_with_svi_and_tracegraph_baseline():
    p = _problem()

    def guide():
        scores = pyro.param("scores", torch.zeros(B, T, S, dtype=torch.float64))
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
            sample_alignment(
                "z",
                q,
                estimator="score",
                mask=p["tgt_mask"],
                baseline={"use_decaying_avg_baseline": True},
            )

    svi = SVI(_model(p, None), guide, Adam({"lr": 0.1}), TraceGraph_ELBO(max_plate_nesting=2))
    start = _hand_exact_elbo({**p, "guide": torch.zeros(B, T, S, dtype=torch.float64)})
    for _ in range(200):
        svi.step()
    end = _hand_exact_elbo({**p, "guide": pyro.param("scores").detach()})
    assert end > start + 0.5


def test_straight_through_sites_run_under_trace_elbo_with_padding():
    p = _problem()
    elbo = Trace_ELBO(max_plate_nesting=2)
    scores = p["guide"].clone().requires_grad_()
    loss = elbo.differentiable_loss(
        _model(p, None, RelaxedAlignment), _guide(p, "st", RelaxedAlignment, scores=scores)
    )
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad.masked_select(~p["key_mask"].expand(B, T, S)) == 0).all()


def test_st_estimator_turns_a_categorical_into_a_relaxed_site():
    p = _problem()
    trace = pyro.poutine.trace(_guide(p, "st")).get_trace()
    site = trace.nodes["z"]
    assert isinstance(site["fn"], RelaxedAlignment)
    assert site["value"].shape == (B, T, S)


def test_infer_discrete_map_is_the_posterior_argmax():
    p = _problem()
    model = infer_discrete(config_enumerate(_model(p, None)), first_available_dim=-3, temperature=0)
    trace = pyro.poutine.trace(model).get_trace()
    expected = _posterior(p).argmax(-1)
    # padded queries are masked out of the model entirely, so only real queries have a MAP
    valid = p["tgt_mask"]
    assert torch.equal(trace.nodes["z"]["value"][valid], expected[valid])


def test_compute_marginals_is_the_exact_posterior():
    p = _problem()
    marginals = TraceEnum_ELBO(max_plate_nesting=2).compute_marginals(
        _model(p, "enum"), lambda: None
    )
    expected = _posterior(p)
    assert isinstance(marginals["z"], CategoricalAlignment)
    assert torch.allclose(marginals["z"].attention, expected)


def test_sparse_prior_enumerates_only_its_support():
    p = _problem()
    scores = p["prior"] * 4

    def model():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            prior = SparsemaxAlignment(scores=scores, mask=p["key_mask"])
            z = sample_alignment("z", prior, estimator="enum", mask=p["tgt_mask"])
            ctx = gather(p["enc"], z)
            with pyro.poutine.mask(mask=p["tgt_mask"]):
                pyro.sample("y", pdist.Categorical(logits=ctx @ p["out"]), obs=p["y"])

    trace = pyro.poutine.trace(pyro.infer.enum.config_enumerate(model)).get_trace()
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(model, lambda: None)
    prior = SparsemaxAlignment(scores=scores, mask=p["key_mask"])
    expected = marginal_log_likelihood(prior, _emission_log_prob(p), mask=p["tgt_mask"]).sum()
    assert abs(-loss - expected.item()) < 1e-9
    assert trace.nodes["z"]["fn"].enumerate_support(expand=False).shape[0] <= S


def test_gather_under_enumeration_with_batch_equal_to_queries():
    enc = torch.randn(B, S, H)
    z = torch.arange(S).reshape(S, 1, 1)
    ctx = gather(enc, z)
    assert ctx.shape == (S, B, 1, H)
    for k in range(S):
        assert torch.equal(ctx[k, :, 0], enc[:, k])


def test_gather_sampled_alignment_with_batch_equal_to_queries():
    enc = torch.randn(B, S, H)
    z = torch.randint(S, (B, T))
    ctx = gather(enc, z)
    for b in range(B):
        for t in range(T):
            assert torch.equal(ctx[b, t], enc[b, z[b, t]])


def test_gather_contracts_float_weights():
    enc = torch.randn(B, S, H)
    weights = torch.randn(B, T, S).softmax(-1)
    assert torch.allclose(gather(enc, weights), torch.einsum("bts,bsh->bth", weights, enc))


@pytest.mark.parametrize(
    "values, z, message",
    [
        (torch.randn(5), torch.zeros(2, dtype=torch.long), "values"),
        (torch.randn(2, 4, 3), torch.full((2, 3), 4), "outside"),
        (torch.randn(2, 4, 3), torch.zeros(5, 3, dtype=torch.long), "broadcast"),
        (torch.randn(2, 4, 3), torch.rand(2, 3, 5), "keys=4"),
        (torch.randn(2, 4, 3), torch.zeros(2, 3, dtype=torch.bool), "integer"),
    ],
)
def test_gather_rejects_bad_input(values, z, message):
    with pytest.raises(ValueError, match=message):
        gather(values, z)


def test_sample_alignment_rejects_unknown_estimator_and_mismatches():
    dist = CategoricalAlignment(logits=torch.randn(2, 3))
    with pytest.raises(ValueError, match="estimator"):
        sample_alignment("z", dist, estimator="magic")
    with pytest.raises(ValueError, match="enumerable"):
        sample_alignment("z", RelaxedAlignment(logits=torch.randn(2, 3)), estimator="enum")
    with pytest.raises(ValueError, match="baseline"):
        sample_alignment("z", dist, estimator="enum", baseline={"use_decaying_avg_baseline": 1})


def test_masked_queries_leak_no_baseline_gradient():
    p = _problem()
    p["tgt_mask"] = torch.zeros(B, T, dtype=torch.bool)
    scores = torch.zeros(B, T, S, dtype=torch.float64, requires_grad=True)

    def guide():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
            sample_alignment(
                "z",
                q,
                estimator="score",
                mask=p["tgt_mask"],
                baseline={"baseline_value": torch.ones(B, T, dtype=torch.float64)},
            )

    TraceGraph_ELBO(max_plate_nesting=2).loss_and_grads(_model(p, None), guide)
    assert scores.grad is None or (scores.grad == 0).all()


@pytest.mark.parametrize("value_shape, z_dims", [((3, 4, 5), 3), ((4, 5), 3), ((2, 3, 4, 5), 4),
                                                 ((3, 4, 5), 5)])
def test_gather_at_pyro_enumerated_support_takes_the_transpose_path_exactly(value_shape, z_dims):
    keys = value_shape[-2]
    values = torch.randn(*value_shape, dtype=torch.float64, requires_grad=True)
    site = CategoricalAlignment(logits=torch.zeros((1,) * (z_dims - 1) + (keys,)))
    support = site.enumerate_support(expand=False)
    assert getattr(support, "_pyro_categorical_support", None)
    plain = support.clone()  # same values, no marker: the general gather
    fast, slow = gather(values, support), gather(values, plain)
    assert fast.shape == slow.shape and torch.equal(fast, slow)
    weights = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), values)
    (grad_slow,) = torch.autograd.grad((slow * weights).sum(), values)
    assert torch.allclose(grad_fast, grad_slow)
