"""structattn's Pyro ELBOs: same numbers as the plain-torch estimators and as TraceEnum_ELBO.

The toy model: per (batch, query) an alignment z picks one of S source vectors, the observed
token y is emitted from it; B == T on purpose (naive batch indexing is wrong exactly there).
"""

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam

from structattn.distributions import CategoricalAlignment, SparsemaxAlignment
from structattn.infer import (
    RLOO_ELBO,
    AlignmentTerms,
    ExactELBO,
    ScoreFunctionEstimator,
    StraightThroughELBO,
    StraightThroughEstimator,
    exact_elbo,
    gather,
    sample_alignment,
)

torch.set_num_threads(1)

B, T, S, H, V = 3, 3, 4, 5, 6


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc": torch.randn(B, S, H, generator=g, dtype=torch.float64),
        "out": torch.randn(H, V, generator=g, dtype=torch.float64),
        "prior": torch.randn(B, T, S, generator=g, dtype=torch.float64),
        "guide": torch.randn(B, T, S, generator=g, dtype=torch.float64),
        "y": torch.randint(V, (B, T), generator=g),
        "key_mask": (torch.arange(S) < torch.tensor([S, S - 1, 2])[:, None])[:, None, :],
        "tgt_mask": torch.arange(T) < torch.tensor([T, T, T - 1])[:, None],
    }


def _log_lik(p, z):
    """log p(y | z) at alignments z (integer keys or one-hot weights)."""
    logits = gather(p["enc"], z) @ p["out"]
    return torch.distributions.Categorical(logits=logits).log_prob(p["y"])


def _table(p):
    return _log_lik(p, torch.arange(S).reshape(S, 1, 1)).movedim(0, -1)


def _prior_dist(p, sparse=False):
    if sparse:
        return SparsemaxAlignment(scores=p["prior"] * 3, mask=p["key_mask"])
    return CategoricalAlignment(logits=p["prior"], mask=p["key_mask"])


def _model(p, estimator=None, sparse=False):
    def model():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            z = sample_alignment(
                "z", _prior_dist(p, sparse), estimator=estimator, mask=p["tgt_mask"]
            )
            with pyro.poutine.mask(mask=p["tgt_mask"]):
                pyro.sample(
                    "y", pdist.Categorical(logits=gather(p["enc"], z) @ p["out"]), obs=p["y"]
                )

    return model


def _guide(p, estimator, scores, sparse=False):
    def guide():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            if sparse:
                q = SparsemaxAlignment(scores=scores * 3, mask=p["key_mask"])
            else:
                q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
            sample_alignment("z", q, estimator=estimator, mask=p["tgt_mask"])

    return guide


@pytest.mark.parametrize("kl", ["analytic", "sampled"])
def test_rloo_elbo_equals_the_plain_torch_estimator_under_the_same_seed(kl):
    p = _problem()
    scores = p["guide"].clone().requires_grad_()
    pyro.set_rng_seed(3)
    loss = RLOO_ELBO(4, max_plate_nesting=2, kl=kl).differentiable_loss(
        _model(p), _guide(p, "rloo", scores)
    )
    (grad,) = torch.autograd.grad(loss, scores)
    pyro.set_rng_seed(3)
    q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
    terms = AlignmentTerms(_prior_dist(p), lambda z: _log_lik(p, z), p["tgt_mask"])
    torch_loss = ScoreFunctionEstimator("loo", num_samples=4, kl=kl).loss(terms, q)
    (torch_grad,) = torch.autograd.grad(torch_loss, scores)
    assert torch.allclose(loss, torch_loss)
    assert torch.allclose(grad, torch_grad)


def test_straight_through_elbo_equals_the_plain_torch_estimator_under_the_same_seed():
    p = _problem()
    scores = p["guide"].clone().requires_grad_()
    pyro.set_rng_seed(5)
    loss = StraightThroughELBO(max_plate_nesting=2).differentiable_loss(
        _model(p), _guide(p, "st", scores)
    )
    (grad,) = torch.autograd.grad(loss, scores)
    pyro.set_rng_seed(5)
    q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
    terms = AlignmentTerms(_prior_dist(p), lambda z: _log_lik(p, z), p["tgt_mask"])
    torch_loss = StraightThroughEstimator(temperature=1.0).loss(terms, q)
    (torch_grad,) = torch.autograd.grad(torch_loss, scores)
    assert torch.allclose(loss, torch_loss)
    assert torch.allclose(grad, torch_grad)
    assert (grad.masked_select(~p["key_mask"].expand(B, T, S)) == 0).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_exact_elbo_guide_side_matches_traceenum_and_the_hand_computed_value(sparse):
    p = _problem()
    scores = p["guide"].clone().requires_grad_()
    model, guide = (
        _model(p, sparse=sparse),
        _guide(p, "sparse" if sparse else "enum", scores, sparse),
    )
    ours = ExactELBO(max_plate_nesting=2).differentiable_loss(model, guide)
    theirs = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(model, guide)
    assert torch.allclose(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours, scores)
    (grad_theirs,) = torch.autograd.grad(theirs, scores)
    assert torch.allclose(grad_ours, grad_theirs)
    if not sparse:
        q = CategoricalAlignment(logits=p["guide"], mask=p["key_mask"])
        hand = exact_elbo(q, _prior_dist(p), _table(p), p["tgt_mask"]).sum()
        assert torch.allclose(-ours, hand)


@pytest.mark.parametrize("estimator", ["enum", "sparse"])
def test_exact_elbo_model_side_is_the_marginal_likelihood(estimator):
    p = _problem()
    p["prior"].requires_grad_()
    model = _model(p, estimator, sparse=estimator == "sparse")
    ours = ExactELBO(max_plate_nesting=2).differentiable_loss(model, lambda: None)
    theirs = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(model, lambda: None)
    assert torch.allclose(ours, theirs)
    grads = [torch.autograd.grad(loss, p["prior"])[0] for loss in (ours, theirs)]
    assert torch.allclose(*grads)


def test_rloo_elbo_masked_queries_get_exactly_zero_gradient():
    p = _problem()
    scores = p["guide"].clone().requires_grad_()
    loss = RLOO_ELBO(3, max_plate_nesting=2).differentiable_loss(
        _model(p), _guide(p, "rloo", scores)
    )
    (grad,) = torch.autograd.grad(loss, scores)
    assert (grad[~p["tgt_mask"]] == 0).all()
    assert grad[p["tgt_mask"]].abs().sum() > 0


def test_loss_and_grads_runs_backward_without_param_sites():
    """Pyro's Trace_ELBO/TraceEnum_ELBO skip backward here (pitfall P13); ours must not."""
    p = _problem()
    for elbo, estimator in (
        (RLOO_ELBO(2, max_plate_nesting=2), "rloo"),
        (ExactELBO(max_plate_nesting=2), "enum"),
        (StraightThroughELBO(max_plate_nesting=2), "st"),
    ):
        scores = p["guide"].clone().requires_grad_()
        loss = elbo.loss_and_grads(_model(p), _guide(p, estimator, scores))
        assert isinstance(loss, float)
        assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_loss_is_the_negative_elbo_estimate_and_guesses_plate_nesting():
    p = _problem()
    scores = p["guide"].clone()
    exact = ExactELBO().loss(_model(p), _guide(p, "enum", scores))
    estimates = [RLOO_ELBO(200).loss(_model(p), _guide(p, "rloo", scores)) for _ in range(3)]
    assert abs(sum(estimates) / 3 - exact) < 0.3


def test_rloo_elbo_trains_a_guide_with_svi():
    p = _problem()

    def guide():
        scores = pyro.param("scores", torch.zeros(B, T, S, dtype=torch.float64))
        _guide(p, "rloo", scores)()

    def exact(scores):
        q = CategoricalAlignment(logits=scores, mask=p["key_mask"])
        return exact_elbo(q, _prior_dist(p), _table(p), p["tgt_mask"]).sum().item()

    svi = SVI(_model(p), guide, Adam({"lr": 0.1}), RLOO_ELBO(4, max_plate_nesting=2))
    start = exact(torch.zeros(B, T, S, dtype=torch.float64))
    for _ in range(100):
        svi.step()
    assert exact(pyro.param("scores").detach()) > start + 0.5


def test_elbo_module_gives_a_torch_loss():
    p = _problem()

    class Guide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scores = torch.nn.Parameter(p["guide"].clone())

        def forward(self):
            _guide(p, "rloo", self.scores)()

    class Model(torch.nn.Module):
        def forward(self):
            _model(p)()

    guide = Guide()
    loss = RLOO_ELBO(2, max_plate_nesting=2)(Model(), guide)()
    loss.backward()
    assert guide.scores.grad is not None


def test_elbo_settings_and_unsupported_models_raise_value_error():
    p = _problem()
    scores = p["guide"].clone()
    with pytest.raises(ValueError, match="num_samples"):
        RLOO_ELBO(1)
    with pytest.raises(ValueError, match="kl"):
        RLOO_ELBO(2, kl="relaxed")
    with pytest.raises(ValueError, match="max_plate_nesting"):
        ExactELBO(max_plate_nesting=-1)
    with pytest.raises(ValueError, match="enumerated"):
        RLOO_ELBO(2, max_plate_nesting=2).loss(_model(p), _guide(p, "enum", scores))
    with pytest.raises(ValueError, match="not enumerated"):
        ExactELBO(max_plate_nesting=2).loss(_model(p), _guide(p, "rloo", scores))


def test_sample_alignment_accepts_the_new_estimators():
    p = _problem()
    trace = pyro.poutine.trace(_guide(p, "rloo", p["guide"])).get_trace()
    assert trace.nodes["z"]["infer"]["alignment_estimator"] == "rloo"
    with pytest.raises(ValueError, match="sparse"):
        sample_alignment("z", CategoricalAlignment(logits=p["guide"]), estimator="sparse")
    with pytest.raises(ValueError, match="baseline"):
        sample_alignment(
            "z",
            CategoricalAlignment(logits=p["guide"]),
            estimator="rloo",
            baseline={"use_decaying_avg_baseline": True},
        )


def test_rloo_elbo_handles_a_structured_site_like_the_plain_torch_estimator():
    from structattn.distributions.chain import LinearChainCRF

    g = torch.Generator().manual_seed(1)
    batch, num, states = 3, 4, 3
    prior_potentials = torch.randn(batch, num - 1, states, states, generator=g, dtype=torch.float64)
    guide_potentials = torch.randn(
        batch, num - 1, states, states, generator=g, dtype=torch.float64, requires_grad=True
    )
    weights = torch.randn(num, states, generator=g, dtype=torch.float64)

    def log_lik(z):
        picked = weights.expand(z.shape + (states,)).gather(-1, z.unsqueeze(-1)).squeeze(-1)
        return -(picked.sum(-1) ** 2) / 4

    def model():
        with pyro.plate("batch", batch, dim=-1):
            z = pyro.sample("z", LinearChainCRF(prior_potentials))
            pyro.factor("y", log_lik(z))

    def guide():
        with pyro.plate("batch", batch, dim=-1):
            pyro.sample("z", LinearChainCRF(guide_potentials))

    pyro.set_rng_seed(11)
    loss = RLOO_ELBO(3, max_plate_nesting=1).differentiable_loss(model, guide)
    (grad,) = torch.autograd.grad(loss, guide_potentials)
    pyro.set_rng_seed(11)
    terms = AlignmentTerms(LinearChainCRF(prior_potentials), log_lik)
    torch_loss = ScoreFunctionEstimator("loo", num_samples=3).loss(
        terms, LinearChainCRF(guide_potentials)
    )
    (torch_grad,) = torch.autograd.grad(torch_loss, guide_potentials)
    assert torch.allclose(loss, torch_loss)
    assert torch.allclose(grad, torch_grad)


# ----------------------------------------------------------------------------------------
# Padded queries with -inf / NaN emissions, and bad settings (issue 9, items 4 and 11)
# ----------------------------------------------------------------------------------------
def _poisoned_model(p, table, estimator):
    def model():
        with pyro.plate("batch", B, dim=-2), pyro.plate("tgt", T, dim=-1):
            z = sample_alignment("z", _prior_dist(p), estimator=estimator, mask=p["tgt_mask"])
            shape = torch.broadcast_shapes(z.shape, table.shape[:-1])
            index = z.expand(shape).unsqueeze(-1)
            picked = table.expand(shape + (S,)).gather(-1, index).squeeze(-1)
            with pyro.poutine.mask(mask=p["tgt_mask"]):
                pyro.factor("y", picked)

    return model


@pytest.mark.parametrize("poison", [float("-inf"), float("nan")])
@pytest.mark.parametrize(
    "elbo, model_estimator, guide_estimator",
    [
        (lambda: ExactELBO(max_plate_nesting=2), "enum", None),
        (lambda: ExactELBO(max_plate_nesting=2), None, "enum"),
        (lambda: RLOO_ELBO(3, max_plate_nesting=2), None, "rloo"),
        (lambda: RLOO_ELBO(3, max_plate_nesting=2, kl="sampled"), None, "rloo"),
    ],
)
def test_pyro_elbos_are_finite_with_poisoned_padded_queries(
    elbo, model_estimator, guide_estimator, poison
):
    pyro.enable_validation(False)  # Pyro's own validation refuses a NaN factor anywhere
    p = _problem()
    prior_logits = p["prior"].clone().requires_grad_()
    scores = p["guide"].clone().requires_grad_()
    p["prior"] = prior_logits
    table = torch.where(p["tgt_mask"][..., None], _table(p), poison)

    def empty_guide():
        pass

    guide = empty_guide if guide_estimator is None else _guide(p, guide_estimator, scores)
    loss = elbo().differentiable_loss(_poisoned_model(p, table, model_estimator), guide)
    assert torch.isfinite(loss)
    grads = torch.autograd.grad(loss, [prior_logits, scores], allow_unused=True)
    for grad in grads:
        if grad is not None:
            assert torch.isfinite(grad).all()
            assert (grad[~p["tgt_mask"]] == 0).all()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: RLOO_ELBO(2.0), "num_samples"),
        (lambda: RLOO_ELBO(None), "num_samples"),
        (lambda: RLOO_ELBO(2, kl=None), "kl"),
        (lambda: RLOO_ELBO(2, max_plate_nesting="2"), "max_plate_nesting"),
        (lambda: RLOO_ELBO(2, retain_graph="yes"), "retain_graph"),
        (lambda: StraightThroughELBO(num_samples=0), "num_samples"),
        (lambda: StraightThroughELBO(max_plate_nesting=1.5), "max_plate_nesting"),
        (lambda: ExactELBO(max_plate_nesting=True), "max_plate_nesting"),
        (lambda: ExactELBO(retain_graph=1), "retain_graph"),
        (lambda: sample_alignment("z", CategoricalAlignment(logits=torch.randn(2, 3)),
                                  estimator="st", temperature=None), "temperature"),
        (lambda: sample_alignment("z", CategoricalAlignment(logits=torch.randn(2, 3)),
                                  estimator=["enum"]), "estimator"),
        (lambda: sample_alignment("z", CategoricalAlignment(logits=torch.randn(2, 3)),
                                  estimator="score", baseline=1.0), "baseline"),
        (lambda: sample_alignment("z", CategoricalAlignment(logits=torch.randn(2, 3)),
                                  mask=torch.ones(2)), "mask"),
    ],
)
def test_bad_elbo_and_site_arguments_raise_value_error_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()
