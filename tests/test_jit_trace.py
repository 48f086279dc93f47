"""torch.jit.trace (and Pyro's Jit* ELBOs, which trace the model and guide): a trace made on one
input must give eager's answer on every other input, or refuse clearly while tracing.

A trace records tensor operations and freezes every Python decision taken on values.  The
simplex maps keep their data-dependent steps inside autograd Functions, which a trace records
as calls that run again on each new input; the structured distributions choose their dynamic
programs in Python and refuse.  Each check traces on small scores and replays on scores 30x
larger (other supports, other branches) with other per-row alphas.
"""

import warnings

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    config_enumerate,
)
from pyro.optim import Adam

import structattn as sa
from structattn.functional import entmax15, entmax_bisect, masked_softmax, sparsemax

torch.set_num_threads(1)


def _trace(fn, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the frozen validation checks
        return torch.jit.trace(fn, inputs, check_trace=False)


MAPS = {
    "softmax": masked_softmax,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "entmax_bisect 1.3 (CPU kernel)": lambda z: entmax_bisect(z, 1.3),
    "entmax_bisect 2.5 (general path)": lambda z: entmax_bisect(z, 2.5),
    "entmax_bisect float64": lambda z: entmax_bisect(z.double(), 1.7).float(),
}


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_traced_simplex_map_gives_eager_values_and_gradients_on_other_inputs(name, grad):
    fn = MAPS[name]
    first, other = torch.randn(5, 11), 30 * torch.randn(5, 11)
    with torch.set_grad_enabled(grad):
        traced = _trace(fn, first.requires_grad_(grad))
        replayed, eager = other.clone().requires_grad_(grad), other.clone().requires_grad_(grad)
        assert torch.equal(traced(replayed), fn(eager))
    if grad:
        weights = torch.randn(5, 11)
        (traced(replayed) * weights).sum().backward()
        (fn(eager) * weights).sum().backward()
        torch.testing.assert_close(replayed.grad, eager.grad)


def test_a_traced_learned_alpha_follows_the_alphas_of_each_call():
    """Traced with alphas the CPU kernel takes, replayed with alphas it does not (1.05, 2.5):
    the choice of path is made again on each call."""
    def fn(z, alpha):
        return entmax_bisect(z, alpha)

    traced = _trace(fn, torch.randn(4, 9), torch.full((4, 1), 1.5, requires_grad=True))
    z = 30 * torch.randn(4, 9)
    alpha = torch.tensor([[1.05], [1.5], [2.5], [1.3]], requires_grad=True)
    copy = alpha.detach().clone().requires_grad_()
    torch.testing.assert_close(traced(z, alpha), fn(z, copy), rtol=0, atol=0)
    traced(z, alpha)[:, 0].sum().backward()
    fn(z, copy)[:, 0].sum().backward()
    torch.testing.assert_close(alpha.grad, copy.grad)


@pytest.mark.parametrize("normalizer", ["sparsemax", "entmax15", "entmax"])
def test_a_traced_multihead_layer_with_sparse_heads_gives_eager_outputs(normalizer):
    torch.manual_seed(0)

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = sa.nn.MultiheadAttention(16, 4, batch_first=True, normalizer=normalizer)

        def forward(self, x):
            return self.layer(x, x, x, need_weights=False)[0]

    module = SelfAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (torch.randn(2, 5, 16),), check_trace=False)
    x = 30 * torch.randn(2, 5, 16)
    torch.testing.assert_close(traced(x), module(x))


def _per_query_model(dist_cls, y):
    def model():
        scores = pyro.param("prior", torch.zeros(3, 4, 5))
        emit = pyro.param("emit", torch.randn(5, 6))
        with pyro.plate("b", 3, dim=-2), pyro.plate("t", 4, dim=-1):
            z = pyro.sample("z", dist_cls(logits=scores))
            pyro.sample("y", pdist.Categorical(logits=emit[z]), obs=y)

    def guide():
        scores = pyro.param("q", torch.zeros(3, 4, 5))
        with pyro.plate("b", 3, dim=-2), pyro.plate("t", 4, dim=-1):
            pyro.sample("z", dist_cls(logits=scores))

    return model, guide


@pytest.mark.parametrize("dist_cls", [sa.CategoricalAlignment, sa.SparsemaxAlignment])
def test_pyro_jit_elbos_estimate_the_exact_elbo_at_the_current_parameters(dist_cls):
    """JitTraceEnum_ELBO (exact, enumerated guide) equals TraceEnum_ELBO; JitTrace_ELBO (many
    vectorised particles) is within Monte Carlo error of it; both after the parameters moved
    (the replay reads the new values)."""
    y = torch.randint(6, (3, 4), generator=torch.Generator().manual_seed(0))
    model, guide = _per_query_model(dist_cls, y)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    exact = TraceEnum_ELBO(max_plate_nesting=2)
    traced_exact = JitTraceEnum_ELBO(max_plate_nesting=2)
    traced_sampled = JitTrace_ELBO(num_particles=4000, vectorize_particles=True,
                                   max_plate_nesting=2)
    enumerated = config_enumerate(guide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for move in range(2):
            if move:  # new parameter values after the traces were made
                with torch.no_grad():
                    pyro.param("q").add_(torch.randn(3, 4, 5))
                    pyro.param("prior").add_(torch.randn(3, 4, 5))
            value = exact.loss(model, enumerated)
            assert traced_exact.loss_and_grads(model, enumerated) == pytest.approx(value, rel=1e-5)
            estimate = traced_sampled.loss_and_grads(model, guide)
            assert estimate == pytest.approx(value, abs=0.5)


def test_pyro_jit_elbo_with_a_structured_distribution_refuses_by_name():
    def model():
        with pyro.plate("b", 2):
            pyro.sample("z", sa.LinearChainCRF(pyro.param("p", torch.zeros(2, 3, 4, 4))))

    def guide():
        with pyro.plate("b", 2):
            pyro.sample("z", sa.LinearChainCRF(pyro.param("q", torch.zeros(2, 3, 4, 4))))

    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 0.1}), JitTrace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="LinearChainCRF cannot be recorded by torch.jit"):
            svi.step()
    pyro.clear_param_store()
    assert isinstance(SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO()).step(), float)
