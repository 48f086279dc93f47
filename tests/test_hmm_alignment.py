"""HMMAlignment against brute-force enumeration of every alignment sequence."""

import itertools
import math

import pytest
import torch

from structattn.distributions.hmm import HMMAlignment, jump_buckets
from structattn.nn.hmm import HMMNormalizer

SCALES = (1.0, 30.0, 100.0)
DTYPES = (torch.float32, torch.float64)


def _brute_force_log_joint(jumps, emissions, p0, source_length, target_length):
    """Every state sequence of length ``target_length`` with its log score, from the model's
    generative story (written independently of the dynamic program)."""
    num_sources = emissions.shape[-1] - (p0 is not None)
    states = range(2 * num_sources if p0 is not None else num_sources)
    max_jump = jumps.shape[-1] // 2

    def log_jump(previous, nxt):
        row = [jumps[min(max(i - previous, -max_jump), max_jump) + max_jump]
               for i in range(source_length)]
        return float(jumps[min(max(nxt - previous, -max_jump), max_jump) + max_jump]
                     - torch.logsumexp(torch.stack(row), 0))

    table = {}
    for z in itertools.product(states, repeat=target_length):
        score, previous, ok = 0.0, -1, True
        for t, state in enumerate(z):
            null = state >= num_sources
            position = state % num_sources
            if position >= source_length:
                ok = False
                break
            if null:
                if t > 0 and position != previous:
                    ok = False
                    break
                if t == 0:
                    score += log_jump(-1, position)
                score += math.log(p0) + float(emissions[t, num_sources])
            else:
                score += log_jump(previous, position) + float(emissions[t, position])
                if p0 is not None:
                    score += math.log(1 - p0)
            previous = position
        if ok:
            table[z] = score
    return table


def _log_z(truth):
    return torch.logsumexp(torch.tensor(list(truth.values()), dtype=torch.float64), 0)


def _case(scale, dtype, null, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_targets, num_sources, max_jump = 3, 3, 1
    jumps = scale * torch.randn(2, 2 * max_jump + 1, generator=generator, dtype=torch.float64)
    columns = num_sources + int(null)
    emissions = scale * torch.randn(2, num_targets, columns, generator=generator,
                                    dtype=torch.float64)
    source_lengths = torch.tensor([3, 2])
    target_lengths = torch.tensor([3, 2])
    p0 = 0.3 if null else None
    dist = HMMAlignment(jumps.to(dtype), emissions.to(dtype), target_lengths, source_lengths,
                        null_probability=p0)
    truths = [_brute_force_log_joint(jumps[b], emissions[b], p0, int(source_lengths[b]),
                                     int(target_lengths[b])) for b in range(2)]
    return dist, truths, p0


def _tolerance(dtype, scale):
    return dict(rtol=1e-4, atol=1e-4 * scale) if dtype == torch.float32 else dict(
        rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_log_partition_matches_brute_force(scale, dtype, null):
    dist, truths, _ = _case(scale, dtype, null)
    expected = torch.tensor([_log_z(t) for t in truths],
                            dtype=torch.float64)
    torch.testing.assert_close(dist.log_partition.double(), expected, **_tolerance(dtype, scale))


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_is_the_brute_force_posterior_marginals(scale, dtype, null):
    dist, truths, _ = _case(scale, dtype, null)
    num_sources = 3
    attention = dist.attention.double()
    assert attention.shape == (2, 3, num_sources + int(null))
    for b, truth in enumerate(truths):
        log_z = _log_z(truth)
        expected = torch.zeros(3, num_sources + int(null), dtype=torch.float64)
        for z, score in truth.items():
            for t, state in enumerate(z):
                column = num_sources if state >= num_sources else state
                expected[t, column] += math.exp(score - log_z)
        atol = 1e-4 if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(attention[b], expected, rtol=0, atol=atol)


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_argmax_is_the_best_sequence(scale, dtype, null):
    dist, truths, _ = _case(scale, dtype, null)
    for b, truth in enumerate(truths):
        best = max(truth, key=truth.get)
        length = len(best)
        found = tuple(dist.argmax[b, :length].tolist())
        # a tie within rounding may pick either; compare the scores then
        assert found == best or abs(truth[found] - truth[best]) < 1e-4 * scale
        assert dist.argmax[b, length:].eq(0).all()


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_log_prob_and_entropy_match_brute_force(scale, dtype, null):
    dist, truths, _ = _case(scale, dtype, null)
    for b, truth in enumerate(truths):
        log_z = _log_z(truth)
        probs = torch.tensor([math.exp(s - log_z) for s in truth.values()], dtype=torch.float64)
        scores = torch.tensor(list(truth.values()), dtype=torch.float64)
        entropy = -(probs * (scores - log_z)).sum()
        atol = 1e-3 * max(1.0, scale / 10) if dtype == torch.float32 else 1e-7
        assert float(dist.entropy()[b]) == pytest.approx(float(entropy), abs=atol)
        for z, score in list(truth.items())[:20]:
            value = torch.zeros(2, 3, dtype=torch.long)
            value[b, : len(z)] = torch.tensor(z)
            assert float(dist.log_prob(value)[b]) == pytest.approx(score - float(log_z),
                                                                     abs=atol * 10)


@pytest.mark.parametrize("null", [False, True])
def test_sample_frequencies_match_brute_force(null):
    dist, truths, _ = _case(1.0, torch.float64, null, seed=3)
    draws = dist.sample((20000,))
    for b, truth in enumerate(truths):
        log_z = _log_z(truth)
        length = len(next(iter(truth)))
        counts = {}
        for row in draws[:, b, :length].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        assert set(counts) <= set(truth)
        total_variation = 0.5 * sum(abs(counts.get(z, 0) / 20000 - math.exp(s - log_z))
                                    for z, s in truth.items())
        assert total_variation < 0.03


def test_jump_scores_get_gradients_that_pass_gradcheck():
    generator = torch.Generator().manual_seed(1)
    jumps = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    emissions = torch.randn(2, 4, 4, dtype=torch.float64, generator=generator,
                            requires_grad=True)

    def log_z(jumps, emissions):
        return HMMAlignment(jumps, emissions, source_lengths=torch.tensor([3, 2]),
                            null_probability=0.2).log_partition

    assert torch.autograd.gradcheck(log_z, (jumps, emissions))


def test_jump_buckets_clip_wide_jumps_and_score_the_start_from_minus_one():
    buckets = jump_buckets(4, 1)
    assert buckets[3, 0].item() == 2  # jump +3 clipped to +1
    assert buckets[0, 3].item() == 0  # jump -3 clipped to -1
    assert buckets[4].tolist() == [2, 2, 2, 2]  # from -1: jumps +1 .. +4


def test_prior_without_emissions_has_log_partition_zero():
    dist = HMMAlignment(torch.randn(3), torch.zeros(2, 4, 5), null_probability=0.1,
                        source_lengths=torch.tensor([4, 2]))
    torch.testing.assert_close(dist.log_partition, torch.zeros(2), atol=1e-5, rtol=0)


def test_is_a_pyro_site():
    import pyro

    dist = HMMAlignment(torch.zeros(3), torch.randn(2, 3, 4))
    trace = pyro.poutine.trace(lambda: pyro.sample("z", dist)).get_trace()
    assert trace.nodes["z"]["value"].shape == (2, 3)
    assert dist.event_shape == (3,) and dist.batch_shape == (2,)


@pytest.mark.parametrize("bad", [
    dict(jump_scores=torch.zeros(4)),
    dict(null_probability=1.5),
    dict(source_lengths=torch.tensor([5])),
])
def test_bad_arguments_raise_value_error_naming_them(bad):
    arguments = dict(jump_scores=torch.zeros(3), emission_log_likelihoods=torch.zeros(1, 2, 4),
                     null_probability=0.2)
    arguments.update(bad)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name.split("_")[0]):
        HMMAlignment(**arguments)


def test_normalizer_returns_an_hmm_alignment_over_the_scores():
    normalizer = HMMNormalizer(max_jump=2)
    scores = torch.randn(2, 3, 4)
    mask = torch.tensor([[True] * 4, [True, True, False, False]]).unsqueeze(1)
    dist = normalizer(scores, mask)
    assert isinstance(dist, HMMAlignment)
    weights = normalizer.weights(scores, mask)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert weights[1, :, 2:].abs().max() < 1e-6
    dist.log_partition.sum().backward()
    assert normalizer.jump_scores.grad is not None


def test_normalizer_rejects_a_mask_that_is_not_a_prefix():
    with pytest.raises(ValueError, match="mask"):
        HMMNormalizer()(torch.randn(1, 2, 3), torch.tensor([True, False, True]))
