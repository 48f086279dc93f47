"""LinearChainCRF and the segmentation CRF against brute-force enumeration of label sequences."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import Adam

from structattn.distributions.chain import LinearChainCRF, segmentation_crf

torch.set_num_threads(1)


def enumerate_sequences(crf: LinearChainCRF, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every label sequence of batch element ``index`` (zero-padded) and its exact log p."""
    length = int(crf.lengths.reshape(-1)[index])
    num_nodes = crf.event_shape[0]
    labels = torch.tensor(list(itertools.product(range(crf.num_states), repeat=length)))
    values = torch.zeros(len(labels), num_nodes, dtype=torch.long)
    values[:, :length] = labels
    batch = crf.batch_shape[0]
    scores = crf.score(values.unsqueeze(1).expand(-1, batch, -1))[:, index]
    return values, scores - torch.logsumexp(scores, 0)


def random_crf(
    batch=3, nodes=4, states=3, scale=1.0, dtype=torch.float64, with_lengths=True, seed=0
):
    generator = torch.Generator().manual_seed(seed)
    phi = scale * torch.randn(batch, nodes - 1, states, states, generator=generator, dtype=dtype)
    initial = torch.randn(batch, states, generator=generator, dtype=dtype)
    lengths = torch.tensor([nodes, 1, nodes - 1][:batch]) if with_lengths else None
    return LinearChainCRF(phi, lengths=lengths, initial_potentials=initial)


def brute_force_marginals(crf, index):
    values, log_p = enumerate_sequences(crf, index)
    probs = log_p.exp()
    nodes = torch.zeros(crf.event_shape[0], crf.num_states, dtype=probs.dtype)
    edges = torch.zeros(crf.potentials.shape[1:], dtype=probs.dtype)
    length = int(crf.lengths[index])
    for value, p in zip(values, probs, strict=True):
        for n in range(length):
            nodes[n, value[n]] += p
        for n in range(length - 1):
            edges[n, value[n + 1], value[n]] += p
    return nodes, edges


def test_partition_matches_brute_force_with_lengths():
    crf = random_crf()
    for index in range(3):
        values, _ = enumerate_sequences(crf, index)
        scores = crf.score(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(crf.partition[index], torch.logsumexp(scores, 0))


def test_log_prob_normalizes_over_every_sequence():
    crf = random_crf()
    for index in range(3):
        values, _ = enumerate_sequences(crf, index)
        log_p = crf.log_prob(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.tensor(0.0, dtype=log_p.dtype))


def test_edge_and_node_marginals_match_brute_force():
    crf = random_crf()
    for index in range(3):
        nodes, edges = brute_force_marginals(crf, index)
        torch.testing.assert_close(crf.node_marginals[index], nodes)
        torch.testing.assert_close(crf.marginals[index], edges)


@pytest.mark.parametrize(
    "nodes, states, scale",
    [(60, 2, 1.0), (60, 2, 300.0), (60, 4, 1.0), (9, 3, 1.0), (9, 3, 300.0), (9, 20, 1.0)],
    ids=[
        "blocked-probability",
        "blocked-log",
        "blocked-probability-4-states",
        "sequential-probability",
        "sequential-log",
        "sequential-probability-wide",
    ],
)
def test_fast_marginals_match_autograd_in_every_regime(nodes, states, scale):
    generator = torch.Generator().manual_seed(9)
    phi = scale * torch.randn(
        2, nodes - 1, states, states, generator=generator, dtype=torch.float64
    )
    lengths = torch.tensor([nodes, nodes // 2])
    crf = LinearChainCRF(phi, lengths=lengths)
    leaf = phi.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(LinearChainCRF(leaf, lengths).partition.sum(), leaf)
    torch.testing.assert_close(crf.marginals, grad)


def test_argmax_is_the_best_sequence():
    crf = random_crf()
    best = crf.argmax
    for index in range(3):
        values, log_p = enumerate_sequences(crf, index)
        torch.testing.assert_close(best[index], values[log_p.argmax()])


def test_entropy_and_kl_match_brute_force():
    p, q = random_crf(seed=1), random_crf(seed=2)
    entropy, kl = p.entropy(), p.kl_divergence(q)
    torch.testing.assert_close(torch.distributions.kl_divergence(p, q), kl)
    for index in range(3):
        _, log_p = enumerate_sequences(p, index)
        _, log_q = enumerate_sequences(q, index)
        torch.testing.assert_close(entropy[index], -(log_p.exp() * log_p).sum())
        torch.testing.assert_close(kl[index], (log_p.exp() * (log_p - log_q)).sum())


def test_sample_frequencies_match_probabilities():
    torch.manual_seed(0)
    crf = random_crf(batch=2, nodes=3, states=2, with_lengths=False)
    draws = crf.sample((20000,))
    assert draws.shape == (20000, 2, 3)
    for index in range(2):
        values, log_p = enumerate_sequences(crf, index)
        codes = (draws[:, index] * torch.tensor([4, 2, 1])).sum(-1)
        expected = (values * torch.tensor([4, 2, 1])).sum(-1)
        freq = torch.stack([(codes == c).double().mean() for c in expected])
        assert (freq - log_p.exp()).abs().max() < 0.015


def test_samples_are_zero_past_each_length():
    crf = random_crf()
    draws = crf.sample((50,))
    assert bool((draws[:, 1, 1:] == 0).all()) and bool((draws[:, 2, 3:] == 0).all())


def test_log_prob_accepts_torch_struct_parts():
    crf = random_crf(with_lengths=False)
    value = crf.sample()
    torch.testing.assert_close(crf.log_prob(crf.to_parts(value)), crf.log_prob(value))


def test_gradcheck_log_partition_and_marginals_in_float64():
    phi = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])

    def log_z(x):
        return LinearChainCRF(x, lengths=lengths).partition

    def marginals(x):
        return LinearChainCRF(x, lengths=lengths).marginals

    assert torch.autograd.gradcheck(log_z, (phi,))
    assert torch.autograd.gradgradcheck(log_z, (phi,))
    assert torch.autograd.gradcheck(marginals, (phi,))


def test_variable_lengths_match_each_sequence_alone():
    torch.manual_seed(3)
    phi = torch.randn(3, 9, 4, 4)
    lengths = torch.tensor([10, 4, 1])
    batched = LinearChainCRF(phi, lengths=lengths)
    for index, length in enumerate(lengths.tolist()):
        alone = LinearChainCRF(phi[index : index + 1, : length - 1])
        torch.testing.assert_close(batched.partition[index], alone.partition[0])
        torch.testing.assert_close(batched.node_marginals[index, :length], alone.node_marginals[0])
        torch.testing.assert_close(batched.argmax[index, :length], alone.argmax[0])
        assert bool((batched.node_marginals[index, length:] == 0).all())


def test_float32_scale_100_stays_finite_and_accurate():
    torch.manual_seed(4)
    phi = 100 * torch.randn(2, 63, 8, 8)
    crf32, crf64 = LinearChainCRF(phi), LinearChainCRF(phi.double())
    marginals = crf32.node_marginals
    assert torch.isfinite(marginals).all() and torch.isfinite(crf32.partition).all()
    torch.testing.assert_close(marginals.sum(-1), torch.ones(2, 64), atol=1e-4, rtol=0)
    torch.testing.assert_close(marginals.double(), crf64.node_marginals, atol=1e-3, rtol=0)


@pytest.mark.parametrize("states", [2, 8])
def test_float32_length_1024_stays_finite(states):
    torch.manual_seed(5)
    crf = LinearChainCRF(10 * torch.randn(2, 1023, states, states))
    marginals = crf.node_marginals
    assert torch.isfinite(crf.partition).all()
    torch.testing.assert_close(marginals.sum(-1), torch.ones(2, 1024), atol=1e-3, rtol=0)


def test_half_potentials_run_in_float32_and_return_half():
    phi = torch.randn(2, 5, 3, 3)
    crf = LinearChainCRF(phi.half())
    assert crf.partition.dtype == torch.float16
    torch.testing.assert_close(
        crf.partition.float(), LinearChainCRF(phi.half().float()).partition, atol=1e-2, rtol=0
    )


def test_marginals_build_no_graph_and_leave_the_input_alone():
    phi = torch.randn(2, 5, 3, 3)
    with torch.no_grad():
        assert not LinearChainCRF(phi).marginals.requires_grad
    with torch.inference_mode():
        assert torch.isfinite(LinearChainCRF(phi).marginals).all()
    assert not phi.requires_grad


def test_instances_do_not_share_state():
    phi = torch.randn(1, 4, 3, 3)
    first = LinearChainCRF(phi)
    before = first.partition.clone()
    LinearChainCRF(torch.randn(1, 4, 3, 3), lengths=torch.tensor([2]))
    torch.testing.assert_close(first.partition, before)


def test_expand_and_multiple_batch_dims():
    crf = random_crf(batch=1, with_lengths=False)
    expanded = crf.expand(torch.Size([2, 1]))
    assert expanded.batch_shape == (2, 1)
    torch.testing.assert_close(expanded.partition, crf.partition.expand(2, 1))
    assert expanded.sample((3,)).shape == (3, 2, 1, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(log_potentials=torch.randn(2, 3, 3, 4)), "two equal state dims"),
        (dict(log_potentials=torch.randn(3, 3)), "at least 3 dimensions"),
        (dict(log_potentials=torch.randn(2, 3, 3, 3), lengths=torch.tensor([0, 4])), "lengths"),
        (dict(log_potentials=torch.randn(2, 3, 3, 3), lengths=torch.tensor([5, 4])), "lengths"),
        (dict(log_potentials=torch.randn(2, 3, 3, 3), lengths=torch.tensor([2.0, 4.0])), "integer"),
        (dict(log_potentials=torch.randn(2, 3, 3, 3), lengths=torch.tensor([4, 4, 4])), "lengths"),
        (dict(log_potentials=torch.full((2, 3, 3, 3), float("nan"))), "log_potentials"),
        (dict(log_potentials=torch.randint(0, 3, (2, 3, 3, 3))), "floating-point"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearChainCRF(**kwargs)


def test_segmentation_attention_is_the_marginal_of_state_one():
    torch.manual_seed(6)
    scores = torch.randn(2, 4, dtype=torch.float64)
    transition = torch.randn(2, 2, dtype=torch.float64)
    crf = segmentation_crf(scores, transition, lengths=torch.tensor([4, 3]))
    attention = crf.node_marginals[..., 1]
    for index, length in enumerate([4, 3]):
        expected = torch.zeros(4, dtype=torch.float64)
        weights = []
        configs = list(itertools.product([0, 1], repeat=length))
        for config in configs:
            score = sum(scores[index, s] for s in range(length) if config[s] == 1)
            score = score + sum(transition[config[s + 1], config[s]] for s in range(length - 1))
            weights.append(torch.as_tensor(score, dtype=torch.float64))
        probs = torch.softmax(torch.stack(weights), 0)
        for config, p in zip(configs, probs, strict=True):
            expected[:length] += p * torch.tensor(config[:length], dtype=torch.float64)
        torch.testing.assert_close(attention[index], expected)


def test_score_function_site_under_tracegraph_elbo():
    pyro.clear_param_store()
    torch.manual_seed(7)
    prior = torch.randn(2, 4, 3, 3)
    lengths = torch.tensor([5, 3])
    observed = torch.randn(2, 5)

    def model():
        with pyro.plate("batch", 2):
            z = pyro.sample("z", LinearChainCRF(prior, lengths=lengths))
            pyro.sample("y", dist.Normal(z.float().sum(-1), 1.0), obs=observed.sum(-1))

    def guide():
        phi = pyro.param("phi", torch.zeros(2, 4, 3, 3))
        with pyro.plate("batch", 2):
            pyro.sample("z", LinearChainCRF(phi, lengths=lengths))

    svi = SVI(model, guide, Adam({"lr": 0.01}), TraceGraph_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(pyro.param("phi")).all()
    assert not torch.equal(pyro.param("phi").detach(), torch.zeros(2, 4, 3, 3))


def test_log_partition_is_an_exact_marginal_likelihood_factor():
    phi = torch.randn(2, 4, 3, 3, requires_grad=True)

    def model():
        pyro.factor("log_z", LinearChainCRF(phi).log_partition.sum())

    trace = pyro.poutine.trace(model).get_trace()
    trace.log_prob_sum().backward()
    torch.testing.assert_close(phi.grad, LinearChainCRF(phi.detach()).marginals)


def test_score_function_site_under_trace_elbo_moves_toward_the_prior():
    pyro.clear_param_store()
    torch.manual_seed(8)
    prior = 3 * torch.randn(1, 3, 2, 2)

    def model():
        pyro.sample("z", LinearChainCRF(prior))

    def guide():
        pyro.sample("z", LinearChainCRF(pyro.param("phi", torch.zeros(1, 3, 2, 2))))

    svi = SVI(
        model, guide, Adam({"lr": 0.1}), Trace_ELBO(num_particles=16, vectorize_particles=True)
    )
    start = LinearChainCRF(torch.zeros(1, 3, 2, 2)).kl_divergence(LinearChainCRF(prior))
    for _ in range(100):
        svi.step()
    end = LinearChainCRF(pyro.param("phi").detach()).kl_divergence(LinearChainCRF(prior))
    assert float(end) < 0.5 * float(start)


# ------------------------------------------- brute force at every scale, float32 and float64
SCALES = [1.0, 30.0, 100.0]
DTYPES = [torch.float32, torch.float64]


def scaled_crf(scale, dtype, seed=0, batch=3, nodes=4, states=3):
    generator = torch.Generator().manual_seed(seed)
    phi = scale * torch.randn(batch, nodes - 1, states, states, generator=generator)
    initial = scale * torch.randn(batch, states, generator=generator)
    lengths = torch.tensor([nodes, 1, nodes - 1][:batch])
    return LinearChainCRF(phi.to(dtype), lengths=lengths, initial_potentials=initial.to(dtype))


def as_float64(crf):
    return LinearChainCRF(crf.potentials.double(), crf.lengths, crf.initial_potentials.double())


def tolerance(dtype, scale):
    return (
        dict(rtol=0, atol=1e-9 * scale)
        if dtype == torch.float64
        else dict(rtol=0, atol=2e-5 * scale)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_every_quantity_matches_brute_force_at_every_scale(scale, dtype):
    crf = scaled_crf(scale, dtype)
    exact = as_float64(crf)
    partition, edges, nodes = crf.partition, crf.marginals, crf.node_marginals
    entropy, best = crf.entropy(), crf.argmax
    for index in range(3):
        values, log_p = enumerate_sequences(exact, index)
        scores = exact.score(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        log_z = torch.logsumexp(scores, 0)
        torch.testing.assert_close(partition[index].double(), log_z, **tolerance(dtype, scale))
        brute_nodes, brute_edges = brute_force_marginals(exact, index)
        atol = 1e-9 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(nodes[index].double(), brute_nodes, rtol=0, atol=atol)
        torch.testing.assert_close(edges[index].double(), brute_edges, rtol=0, atol=atol)
        brute_entropy = -(log_p.exp() * log_p).sum()
        torch.testing.assert_close(entropy[index].double(), brute_entropy, rtol=0, atol=atol * 10)
        torch.testing.assert_close(best[index], values[log_p.argmax()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sample_frequencies_match_brute_force(scale, dtype):
    # larger scales make every distribution nearly deterministic, so frequencies say little
    torch.manual_seed(1)
    crf = scaled_crf(scale, dtype, states=2)
    draws = crf.sample((6000,))
    assert draws.shape == (6000, 3, 4) and draws.dtype == torch.long
    for index in range(3):
        values, log_p = enumerate_sequences(as_float64(crf), index)
        hits = (draws[:, index].unsqueeze(1) == values.unsqueeze(0)).all(-1).double().mean(0)
        assert (hits - log_p.exp()).abs().max() < 0.025


# ------------------------------------------------------ the marginals' analytic backward
def reference_log_partition(phi, initial, lengths):
    """A plain differentiable forward recursion in float64 (second derivatives by autograd)."""
    alpha = initial
    alphas = [alpha]
    for n in range(phi.shape[1]):
        alpha = torch.logsumexp(phi[:, n] + alpha.unsqueeze(-2), -1)
        alphas.append(alpha)
    final = torch.stack(alphas, 1)[torch.arange(phi.shape[0]), lengths - 1]
    return torch.logsumexp(final, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("nodes, states", [(5, 3), (60, 2), (200, 3), (40, 9)])
def test_backward_through_marginals_matches_second_order_autograd(nodes, states, scale, dtype):
    generator = torch.Generator().manual_seed(nodes + states)
    phi = scale * torch.randn(
        3, nodes - 1, states, states, generator=generator, dtype=torch.float64
    )
    initial = torch.randn(3, states, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([nodes, 1, max(1, nodes // 2)])
    edge_weights = torch.randn(phi.shape, generator=generator, dtype=torch.float64)
    node_weights = torch.randn(3, nodes, states, generator=generator, dtype=torch.float64)

    leaf = phi.clone().requires_grad_(True)
    start = initial.clone().requires_grad_(True)
    log_z = reference_log_partition(leaf, start, lengths)
    edges, first = torch.autograd.grad(log_z.sum(), (leaf, start), create_graph=True)
    node_marg = torch.cat([first.unsqueeze(1), edges.sum(-1)], 1)
    positions = torch.arange(nodes) < lengths.unsqueeze(-1)
    node_marg = node_marg * positions.unsqueeze(-1)
    loss = (edges * edge_weights).sum() + (node_marg * node_weights).sum()
    expected = torch.autograd.grad(loss, (leaf, start))

    ours_phi = phi.to(dtype).requires_grad_(True)
    ours_initial = initial.to(dtype).requires_grad_(True)
    crf = LinearChainCRF(ours_phi, lengths=lengths, initial_potentials=ours_initial)
    ours_loss = (crf.marginals * edge_weights.to(dtype)).sum()
    ours_loss = ours_loss + (crf.node_marginals * node_weights.to(dtype)).sum()
    got = torch.autograd.grad(ours_loss, (ours_phi, ours_initial))
    atol = 1e-9 if dtype == torch.float64 else 2e-4
    for ours, reference in zip(got, expected, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), reference, rtol=0, atol=atol)


def test_gradcheck_and_gradgradcheck_of_edge_and_node_marginals():
    phi = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 1])

    def marginals(x, theta):
        crf = LinearChainCRF(x, lengths=lengths, initial_potentials=theta)
        return crf.marginals, crf.node_marginals

    assert torch.autograd.gradcheck(marginals, (phi, initial))
    assert torch.autograd.gradgradcheck(marginals, (phi, initial))


def test_entropy_is_differentiable_and_matches_log_z_minus_expected_score():
    phi = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 3])

    def entropy(x):
        return LinearChainCRF(x, lengths=lengths).entropy()

    def reference(x):
        crf = LinearChainCRF(x, lengths=lengths)
        return crf.partition - (crf.marginals * x).sum((-1, -2, -3))

    torch.testing.assert_close(entropy(phi), reference(phi))
    assert torch.autograd.gradcheck(entropy, (phi,))


@pytest.mark.parametrize("states", [2, 8])
def test_float32_length_1024_scale_1000_matches_float64(states):
    generator = torch.Generator().manual_seed(6)
    phi = 1000 * torch.randn(2, 1023, states, states, generator=generator)
    weights = torch.randn(phi.shape, generator=generator)
    results = {}
    for dtype in (torch.float32, torch.float64):
        leaf = phi.to(dtype).requires_grad_(True)
        crf = LinearChainCRF(leaf)
        marginals = crf.marginals
        (grad,) = torch.autograd.grad((marginals * weights.to(dtype)).sum(), leaf)
        results[dtype] = (crf.partition, marginals, crf.entropy(), crf.argmax, grad)
    single, double = results[torch.float32], results[torch.float64]
    assert all(torch.isfinite(t).all() for t in single[:3] + single[4:])
    torch.testing.assert_close(single[0].double(), double[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(single[1].double(), double[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(single[2].double(), double[2], rtol=0, atol=1e-2)
    torch.testing.assert_close(single[3], double[3])
    torch.testing.assert_close(single[4].double(), double[4], rtol=0, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    nodes=st.integers(1, 4),
    states=st.integers(1, 3),
    scale=st.sampled_from([1.0, 30.0, 100.0]),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_partition_and_marginals_match_brute_force_for_any_shape(
    batch, nodes, states, scale, seed, data
):
    lengths = torch.tensor(
        data.draw(st.lists(st.integers(1, nodes), min_size=batch, max_size=batch))
    )
    generator = torch.Generator().manual_seed(seed)
    phi = scale * torch.randn(batch, nodes - 1, states, states, generator=generator).double()
    initial = torch.randn(batch, states, generator=generator).double()
    crf = LinearChainCRF(phi, lengths=lengths, initial_potentials=initial)
    partition, edges, nodes_marginals = crf.partition, crf.marginals, crf.node_marginals
    for index in range(batch):
        values, log_p = enumerate_sequences(crf, index)
        scores = crf.score(values.unsqueeze(1).expand(-1, batch, -1))[:, index]
        torch.testing.assert_close(partition[index], torch.logsumexp(scores, 0))
        brute_nodes, brute_edges = brute_force_marginals(crf, index)
        torch.testing.assert_close(nodes_marginals[index], brute_nodes)
        torch.testing.assert_close(edges[index], brute_edges)
        torch.testing.assert_close(crf.argmax[index], values[log_p.argmax()])


def test_segmentation_crf_accepts_non_contiguous_scores():
    scores = torch.randn(6, 3, dtype=torch.float64).t()  # (3, 6), transposed
    transition = torch.randn(2, 2, dtype=torch.float64).t()
    ours = segmentation_crf(scores, transition)
    reference = segmentation_crf(scores.contiguous(), transition.contiguous())
    torch.testing.assert_close(ours.partition, reference.partition)
    torch.testing.assert_close(ours.node_marginals, reference.node_marginals)
    torch.testing.assert_close(ours.entropy(), reference.entropy())


def test_max_and_cross_entropy_match_brute_force_and_max_differentiates_to_the_argmax():
    crf, other = random_crf(seed=0), random_crf(seed=1)
    for index in range(3):
        values, log_p = enumerate_sequences(crf, index)
        _, log_q = enumerate_sequences(other, index)
        scores = crf.score(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(crf.max[index], scores.max())
        torch.testing.assert_close(crf.cross_entropy(other)[index], -(log_p.exp() * log_q).sum())
    torch.testing.assert_close(crf.cross_entropy(crf), crf.entropy())
    phi = crf.potentials.detach().requires_grad_()
    tied = LinearChainCRF(phi, lengths=crf.lengths, initial_potentials=crf.initial_potentials)
    (grad,) = torch.autograd.grad(tied.max.sum(), phi)
    torch.testing.assert_close(grad, tied.to_parts(tied.argmax).to(grad.dtype))
    with pytest.raises(ValueError, match="lengths"):
        crf.cross_entropy(random_crf(with_lengths=False))


@pytest.mark.parametrize("nodes, states", [(4, 4), (3, 2), (30, 2), (30, 4), (40, 8)])
def test_ruled_out_steps_give_minus_infinity_not_nan_in_every_scan_kernel(nodes, states):
    """-inf potentials (allowed with validation off, and made by exact inference from an
    impossible emission) rule structures out: a chain with none left has log Z = -inf (a
    shift of -inf used to give NaN), a chain with some left keeps their sum. The sizes reach
    each scan kernel (sequential, blocked log space, probability space)."""
    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(3, nodes - 1, states, states, generator=generator, dtype=torch.float64)
    phi[0] = float("-inf")  # every transition
    phi[1, nodes // 2] = float("-inf")  # one whole step
    phi[2, 0, :, 1] = float("-inf")  # some transitions: structures remain
    log_z = LinearChainCRF(phi, validate_args=False).log_partition
    assert log_z[0] == float("-inf") and log_z[1] == float("-inf")
    floored = phi[2:].clamp(min=-1e4)  # exp(-1e4) is 0 in float64: the same sum
    torch.testing.assert_close(log_z[2:], LinearChainCRF(floored).log_partition)
