"""MonotonicAlignment against brute-force enumeration of every monotone alignment path."""

import itertools

import pyro
import pytest
import torch

from structattn.distributions.monotonic import MonotonicAlignment

torch.set_num_threads(1)


def path_log_joint(logits, emissions, path, source_length, max_jump):
    """log p(y, z | x) of one path by the definition, or None when the path is not allowed."""
    previous, total = 0, torch.zeros((), dtype=logits.dtype)
    for t, k in enumerate(path):
        allowed = [
            j
            for j in range(source_length)
            if previous <= j and (max_jump is None or j - previous <= max_jump)
        ]
        if k not in allowed:
            return None
        total = total + logits[t, k] - torch.logsumexp(logits[t, allowed], 0) + emissions[t, k]
        previous = k
    return total


def enumerate_paths(dist, index):
    """Every allowed path of batch element ``index`` (zero-padded) and its exact log posterior."""
    target = int(dist.target_lengths[index])
    source = int(dist.source_lengths[index])
    num_targets = dist.event_shape[0]
    paths, scores = [], []
    for path in itertools.product(range(source), repeat=target):
        score = path_log_joint(
            dist.alignment_logits[index],
            dist.emission_log_likelihoods[index],
            path,
            source,
            dist.max_jump,
        )
        if score is not None:
            paths.append(list(path) + [0] * (num_targets - target))
            scores.append(score)
    scores = torch.stack(scores)
    return torch.tensor(paths), scores, torch.logsumexp(scores, 0)


def make(max_jump=2, seed=0, emissions=True):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    emission = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64) if emissions else None
    return MonotonicAlignment(
        logits,
        emission,
        target_lengths=torch.tensor([4, 2, 3]),
        source_lengths=torch.tensor([5, 3, 1]),
        max_jump=max_jump,
    )


@pytest.mark.parametrize("max_jump", [1, 2, None])
def test_marginal_likelihood_matches_brute_force(max_jump):
    dist = make(max_jump)
    for index in range(3):
        _, _, log_evidence = enumerate_paths(dist, index)
        torch.testing.assert_close(dist.log_marginal_likelihood[index], log_evidence)


def test_prior_without_emissions_is_normalized():
    torch.testing.assert_close(
        make(emissions=False).log_partition, torch.zeros(3, dtype=torch.float64)
    )


@pytest.mark.parametrize("max_jump", [1, None])
def test_posterior_marginals_log_prob_and_argmax_match_brute_force(max_jump):
    dist = make(max_jump)
    marginals, best = dist.node_marginals, dist.argmax
    for index in range(3):
        paths, scores, log_evidence = enumerate_paths(dist, index)
        posterior = (scores - log_evidence).exp()
        expected = torch.zeros(4, 5, dtype=torch.float64)
        target = int(dist.target_lengths[index])
        for path, p in zip(paths, posterior, strict=True):
            expected[torch.arange(target), path[:target]] += p
        torch.testing.assert_close(marginals[index], expected)
        log_probs = dist.log_prob(paths.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(log_probs, scores - log_evidence)
        torch.testing.assert_close(best[index], paths[scores.argmax()])


def test_entropy_matches_brute_force():
    dist = make()
    entropy = dist.entropy()
    for index in range(3):
        _, scores, log_evidence = enumerate_paths(dist, index)
        log_p = scores - log_evidence
        torch.testing.assert_close(entropy[index], -(log_p.exp() * log_p).sum())


def test_sample_frequencies_match_the_posterior():
    torch.manual_seed(0)
    dist = make()
    draws = dist.sample((20000,))
    for index in range(2):
        paths, scores, log_evidence = enumerate_paths(dist, index)
        weights = torch.tensor([125, 25, 5, 1])
        codes = (draws[:, index] * weights).sum(-1)
        freq = torch.stack([(codes == c).double().mean() for c in (paths * weights).sum(-1)])
        assert abs(float(freq.sum()) - 1.0) < 1e-9, "a sample is not an allowed path"
        assert (freq - (scores - log_evidence).exp()).abs().max() < 0.015


def test_gradcheck_of_the_marginal_likelihood():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    emissions = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def evidence(a, e):
        return MonotonicAlignment(a, e, target_lengths=lengths, max_jump=2).log_partition

    assert torch.autograd.gradcheck(evidence, (logits, emissions))


def test_variable_lengths_match_each_pair_alone():
    torch.manual_seed(1)
    logits, emissions = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    batched = MonotonicAlignment(
        logits, emissions, target_lengths=torch.tensor([6, 3]), source_lengths=torch.tensor([7, 4])
    )
    alone = MonotonicAlignment(logits[1:, :3, :4], emissions[1:, :3, :4])
    torch.testing.assert_close(batched.log_partition[1], alone.log_partition[0])
    torch.testing.assert_close(batched.node_marginals[1, :3, :4], alone.node_marginals[0])
    assert bool((batched.node_marginals[1, :, 4:] == 0).all())


def test_exact_marginal_likelihood_trains_under_pyro():
    torch.manual_seed(2)
    logits = torch.zeros(2, 5, 6, requires_grad=True)
    emissions = torch.randn(2, 5, 6)

    def model():
        with pyro.plate("batch", 2):
            pyro.factor("log_evidence", MonotonicAlignment(logits, emissions).log_partition)

    trace = pyro.poutine.trace(model).get_trace()
    (-trace.log_prob_sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alignment_logits=torch.randn(2, 3)[0]), "alignment_logits"),
        (
            dict(alignment_logits=torch.randn(2, 3, 4), source_lengths=torch.tensor([0, 4])),
            "source_lengths",
        ),
        (
            dict(alignment_logits=torch.randn(2, 3, 4), target_lengths=torch.tensor([4, 3])),
            "target_lengths",
        ),
        (dict(alignment_logits=torch.randn(2, 3, 4), max_jump=0), "max_jump"),
        (
            dict(
                alignment_logits=torch.randn(2, 3, 4), emission_log_likelihoods=torch.randn(2, 3, 5)
            ),
            "emission",
        ),
        (dict(alignment_logits=torch.full((2, 3, 4), float("nan"))), "alignment_logits"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MonotonicAlignment(**kwargs)


def test_expand_keeps_source_lengths_and_jumps():
    dist = make()
    expanded = dist.expand(torch.Size([2, 3]))
    assert expanded.batch_shape == (2, 3) and expanded.source_lengths.shape == (2, 3)
    torch.testing.assert_close(expanded.log_partition, dist.log_partition.expand(2, 3))
    draws = expanded.sample((5,))
    assert draws.shape == (5, 2, 3, 4)
    assert bool((draws[..., 2, :] == 0).all())  # one source position: always aligned to 0


# ------------------------------------------- brute force at every scale, float32 and float64
def scaled(scale, dtype, max_jump=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(3, 4, 5, generator=generator)
    emissions = scale * torch.randn(3, 4, 5, generator=generator)
    return MonotonicAlignment(
        logits.to(dtype),
        emissions.to(dtype),
        target_lengths=torch.tensor([4, 2, 3]),
        source_lengths=torch.tensor([5, 3, 1]),
        max_jump=max_jump,
    )


def as_float64(dist):
    return MonotonicAlignment(
        dist.alignment_logits.double(),
        dist.emission_log_likelihoods.double(),
        target_lengths=dist.target_lengths,
        source_lengths=dist.source_lengths,
        max_jump=dist.max_jump,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("max_jump", [1, None])
def test_every_quantity_matches_brute_force_at_every_scale(max_jump, scale, dtype):
    dist = scaled(scale, dtype, max_jump)
    exact = as_float64(dist)
    evidence, marginals, best, entropy = (
        dist.log_marginal_likelihood,
        dist.node_marginals,
        dist.argmax,
        dist.entropy(),
    )
    atol = 1e-9 if dtype == torch.float64 else 1e-5
    for index in range(3):
        paths, scores, log_evidence = enumerate_paths(exact, index)
        log_posterior = scores - log_evidence
        torch.testing.assert_close(
            evidence[index].double(), log_evidence, rtol=0, atol=atol * scale * 10
        )
        expected = torch.zeros(4, 5, dtype=torch.float64)
        target = int(dist.target_lengths[index])
        for path, p in zip(paths, log_posterior.exp(), strict=True):
            expected[torch.arange(target), path[:target]] += p
        torch.testing.assert_close(marginals[index].double(), expected, rtol=0, atol=atol)
        torch.testing.assert_close(best[index], paths[scores.argmax()])
        brute_entropy = -(log_posterior.exp() * log_posterior).sum()
        torch.testing.assert_close(entropy[index].double(), brute_entropy, rtol=0, atol=atol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sample_frequencies_match_brute_force_in_both_dtypes(dtype):
    torch.manual_seed(2)
    dist = scaled(1.0, dtype)
    draws = dist.sample((6000,))
    for index in range(3):
        paths, scores, log_evidence = enumerate_paths(as_float64(dist), index)
        hits = (draws[:, index].unsqueeze(1) == paths.unsqueeze(0)).all(-1).double().mean(0)
        assert abs(float(hits.sum()) - 1.0) < 1e-9, "a sample is not an allowed path"
        assert (hits - (scores - log_evidence).exp()).abs().max() < 0.025


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_float32_length_1024_is_finite_and_matches_float64(scale):
    generator = torch.Generator().manual_seed(4)
    logits = scale * torch.randn(2, 1024, 12, generator=generator)
    emissions = scale * torch.randn(2, 1024, 12, generator=generator)
    single = MonotonicAlignment(logits, emissions, max_jump=3)
    double = MonotonicAlignment(logits.double(), emissions.double(), max_jump=3)
    evidence, marginals = single.log_marginal_likelihood, single.node_marginals
    assert torch.isfinite(evidence).all() and torch.isfinite(marginals).all()
    torch.testing.assert_close(
        evidence.double(), double.log_marginal_likelihood, rtol=1e-5, atol=1e-3
    )
    torch.testing.assert_close(marginals.double(), double.node_marginals, rtol=0, atol=1e-3)


def test_max_and_cross_entropy_match_brute_force():
    dist, other = make(seed=0), make(seed=1)
    for index in range(3):
        paths, scores, log_evidence = enumerate_paths(dist, index)
        other_paths, other_scores, other_evidence = enumerate_paths(other, index)
        assert torch.equal(paths, other_paths)
        torch.testing.assert_close(dist.max[index], scores.max())
        log_p, log_q = scores - log_evidence, other_scores - other_evidence
        torch.testing.assert_close(dist.cross_entropy(other)[index], -(log_p.exp() * log_q).sum())
