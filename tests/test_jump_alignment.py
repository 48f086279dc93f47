"""JumpAlignment (neural HMM attention) against brute-force enumeration of every path."""

import itertools

import pytest
import torch

from structattn.distributions import JumpAlignment
from structattn.infer import marginal_log_likelihood, posterior

torch.set_num_threads(1)


def bucket(jump: int, width: int) -> int:
    return max(-width, min(width, jump)) + width


def path_log_joint(logits, jumps, emissions, path, source_length):
    """log p(y, z | x) of one path written from the definition (virtual start at -1)."""
    width = jumps.shape[-1] // 2
    previous, total = -1, torch.zeros((), dtype=logits.dtype)
    for t, k in enumerate(path):
        moves = torch.stack([logits[t, j] + jumps[bucket(j - previous, width)]
                             for j in range(source_length)])
        total = total + moves[k] - torch.logsumexp(moves, 0) + emissions[t, k]
        previous = k
    return total


def brute_force(dist, index):
    """Every path of batch element ``index`` (zero-padded), its log joint, and log Z."""
    target = int(dist.target_lengths[index])
    source = int(dist.source_lengths[index])
    paths, scores = [], []
    for path in itertools.product(range(source), repeat=target):
        paths.append(list(path) + [0] * (dist.event_shape[0] - target))
        scores.append(path_log_joint(dist.alignment_logits[index], dist.jump_scores[index],
                                     dist.emission_log_likelihoods[index], path, source))
    scores = torch.stack(scores)
    return torch.tensor(paths), scores, torch.logsumexp(scores, 0)


def make(scale=1.0, dtype=torch.float64, seed=0, emissions=True, width=2):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    jumps = scale * torch.randn(2 * width + 1, generator=generator, dtype=torch.float64)
    table = (scale * torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
             if emissions else None)
    return JumpAlignment(
        logits.to(dtype), jumps.to(dtype), None if table is None else table.to(dtype),
        target_lengths=torch.tensor([4, 2, 3]), source_lengths=torch.tensor([5, 3, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_likelihood_marginals_viterbi_and_log_prob_match_brute_force(scale, dtype):
    dist = make(scale, dtype)
    exact = make(scale, torch.float64)
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * scale} if dtype == torch.float32 else {}
    for index in range(3):
        paths, scores, log_z = brute_force(exact, index)
        target = int(exact.target_lengths[index])
        torch.testing.assert_close(dist.log_marginal_likelihood[index].double(), log_z,
                                   **tolerance)
        weights = (scores - log_z).exp()
        expected = torch.zeros(4, 5, dtype=torch.float64)
        for path, weight in zip(paths, weights, strict=True):
            expected[torch.arange(target), path[:target]] += weight
        torch.testing.assert_close(dist.node_marginals[index, :target].double(),
                                   expected[:target], rtol=1e-4, atol=1e-4)
        best = paths[scores.argmax()]
        assert torch.equal(dist.argmax[index, :target], best[:target])
        sample = paths[3 % len(paths)].unsqueeze(0).expand(3, -1)
        log_prob = dist.log_prob(sample)[index].double()
        torch.testing.assert_close(log_prob, scores[3 % len(paths)] - log_z, **tolerance)


def test_prior_is_normalised_and_its_moves_are_distributions():
    dist = make(emissions=False)
    torch.testing.assert_close(dist.log_partition, torch.zeros(3, dtype=torch.float64))
    first, moves = dist.move_log_probs()
    lengths = dist.source_lengths
    for index in range(3):
        real = int(lengths[index])
        torch.testing.assert_close(first[index, :real].exp().sum(), torch.tensor(1.0).double())
        assert torch.all(first[index, real:] == -torch.inf)
        totals = moves[index, :, :real, :].exp().sum(-2)
        torch.testing.assert_close(totals, torch.ones_like(totals))


def test_jump_scores_receive_gradients_and_gradcheck():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    jumps = torch.randn(5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 3, 4, dtype=torch.float64)

    def log_z(logits, jumps):
        lengths = torch.tensor([4, 2])
        return JumpAlignment(logits, jumps, table, source_lengths=lengths).log_partition

    assert torch.autograd.gradcheck(log_z, (logits, jumps))


def test_infer_reads_it_as_a_chain_prior():
    prior = make(emissions=False)
    table = torch.randn(3, 4, 5, dtype=torch.float64)
    conditioned = JumpAlignment(prior.alignment_logits, prior.jump_scores, table,
                                target_lengths=prior.target_lengths,
                                source_lengths=prior.source_lengths)
    torch.testing.assert_close(marginal_log_likelihood(prior, table),
                               conditioned.log_marginal_likelihood)
    torch.testing.assert_close(posterior(prior, table), conditioned.attention)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4), "odd"),
    (torch.zeros(2, 5), "broadcast"),
    (torch.tensor([0.0, float("nan"), 0.0]), "jump_scores"),
])
def test_bad_jump_scores_raise_value_errors_naming_them(bad, message):
    with pytest.raises(ValueError, match=message):
        JumpAlignment(torch.zeros(3, 4, 5), bad)
