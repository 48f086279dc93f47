"""HMMAlignment against brute-force enumeration of every alignment sequence."""

import itertools
import math

import pytest
import torch

from structattn.distributions.chain import LinearChainCRF
from structattn.distributions.hmm import (
    HMMAlignment,
    jump_buckets,
    move_log_probabilities,
    scaled_forward,
    scaled_forward_is_exact,
)
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


@pytest.mark.parametrize("result, seed, length", [("log_partition", 1, 4),
                                                  ("attention", 5, 3)])
def test_log_partition_and_attention_pass_gradcheck_in_jumps_and_emissions(result, seed, length):
    generator = torch.Generator().manual_seed(seed)
    jumps = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    emissions = torch.randn(2, length, 4, dtype=torch.float64, generator=generator,
                            requires_grad=True)

    def computed(jumps, emissions):
        chain = HMMAlignment(jumps, emissions, source_lengths=torch.tensor([3, 2]),
                             null_probability=0.2)
        return getattr(chain, result)

    assert torch.autograd.gradcheck(computed, (jumps, emissions))


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


# ------------------------------------------------ the fast path and its exactness check
def _random_chain(scale, dtype, null, seed=0, batch=4, num_targets=9, num_sources=6):
    """A larger random batch with ragged source and target lengths."""
    generator = torch.Generator().manual_seed(seed)
    jumps = scale * torch.randn(5, generator=generator, dtype=torch.float64)
    columns = num_sources + int(null)
    emissions = scale * torch.randn(batch, num_targets, columns, generator=generator,
                                    dtype=torch.float64)
    source_lengths = torch.randint(1, num_sources + 1, (batch,), generator=generator)
    target_lengths = torch.randint(1, num_targets + 1, (batch,), generator=generator)
    source_lengths[0], target_lengths[0] = num_sources, num_targets
    return HMMAlignment(jumps.to(dtype), emissions.to(dtype), target_lengths, source_lengths,
                        null_probability=0.2 if null else None)


def _log_space(dist):
    """The same distribution summed by the log-space linear chain on its potentials."""
    return LinearChainCRF(dist.potentials, lengths=dist.lengths,
                          initial_potentials=dist.initial_potentials)


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", SCALES)
def test_fast_path_equals_the_log_space_chain(scale, dtype, null):
    dist = _random_chain(scale, dtype, null)
    chain = _log_space(dist)
    tolerance = _tolerance(dtype, scale)
    torch.testing.assert_close(dist.log_partition.double(), chain.log_partition.double(),
                               **tolerance)
    atol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(dist.node_marginals.double(), chain.node_marginals.double(),
                               rtol=0, atol=atol)


def test_log_partition_and_attention_never_build_the_chain_potentials():
    dist = _random_chain(1.0, torch.float32, True)
    assert torch.isfinite(dist.log_partition).all()
    assert torch.isfinite(dist.attention).all()
    assert dist._chain is None
    assert dist.argmax.shape == (4, 9)  # Viterbi still runs on the chain
    assert dist._chain is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_kernel_is_exact_where_its_check_passes(dtype):
    dist = _random_chain(1.0, dtype, True, seed=4)
    jumps, emissions, sources, targets, null = dist._flat_inputs()
    log_moves = move_log_probabilities(jumps, sources, dist.num_sources)
    inside = torch.arange(dist.num_sources) < sources.unsqueeze(-1)
    inside = torch.cat([inside, torch.ones_like(inside[:, :1])], -1)
    masked = emissions.masked_fill(~inside.unsqueeze(-2), -math.inf)
    assert scaled_forward_is_exact(log_moves, masked, targets, null, dtype).all()
    moves = log_moves.exp()
    value = scaled_forward(moves[:, -1], moves[:, :-1], masked, targets, null)
    torch.testing.assert_close(value.double(), _log_space(dist).log_partition.double(),
                               **_tolerance(dtype, 1.0))


def test_check_rejects_emissions_that_would_underflow_float32_and_the_result_stays_exact():
    """Two source words whose emissions differ by 200 nats at every step: float32's scaled
    forward would drop the weaker word (``exp(-200)`` is zero), the check sends the sequence
    to float64, and a spread of 2000 nats sends it to the log-space chain."""
    for spread, routes_float64 in ((200.0, True), (2000.0, False)):
        emissions = torch.zeros(1, 3, 2)
        emissions[..., 1] = -spread
        jumps = torch.tensor([0.0, 0.0, 5.0])  # the forward jump (to the weak word) is likely
        dist = HMMAlignment(jumps, emissions)
        jumps64, table, sources, targets, _ = dist._flat_inputs()
        log_moves = move_log_probabilities(jumps64, sources, 2)
        assert not scaled_forward_is_exact(log_moves, table, targets, None, torch.float32)
        assert bool(scaled_forward_is_exact(log_moves, table.double(), targets, None,
                                            torch.float64)) == routes_float64
        truth = _log_z(_brute_force_log_joint(jumps.double(), emissions[0].double(), None, 2, 3))
        torch.testing.assert_close(dist.log_partition.double(), truth.view(1), rtol=1e-6,
                                   atol=0)
        posterior = dist.attention
        assert torch.isfinite(posterior).all()
        torch.testing.assert_close(posterior.sum(-1), torch.ones(1, 3))


def _routes(dist):
    """Per sequence, the first dtype whose scaled forward the check accepts (None: log space)."""
    jumps, emissions, sources, targets, null = dist._flat_inputs()
    log_moves = move_log_probabilities(jumps, sources, dist.num_sources)
    inside = torch.arange(dist.num_sources) < sources.unsqueeze(-1)
    inside = torch.cat([inside, inside[:, : emissions.shape[-1] - dist.num_sources]], -1)
    masked = emissions.masked_fill(~inside.unsqueeze(-2), -math.inf)
    routes = [None] * emissions.shape[0]
    for dtype in (torch.float64, emissions.dtype):  # the cheaper one last: it wins
        exact = scaled_forward_is_exact(log_moves, masked, targets, null, dtype)
        routes = [dtype if ok else route for ok, route in zip(exact.tolist(), routes, strict=True)]
    return routes


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_mixing_every_route_matches_brute_force(dtype):
    """Rows at scales 1, 60 and 3000 take the scaled forward in the input dtype, in float64
    (for float32 inputs) and the log-space chain; each matches brute force."""
    generator = torch.Generator().manual_seed(7)
    scales = torch.tensor([1.0, 60.0, 3000.0], dtype=torch.float64).view(3, 1, 1)
    emissions = scales * torch.randn(3, 3, 4, generator=generator, dtype=torch.float64)
    jumps = torch.randn(3, generator=generator, dtype=torch.float64)
    dist = HMMAlignment(jumps.to(dtype), emissions.to(dtype), null_probability=0.3,
                        source_lengths=torch.tensor([3, 2, 3]))
    assert _routes(dist) == [dtype, torch.float64, None]
    for b in range(3):
        truth = _brute_force_log_joint(jumps, emissions[b], 0.3, int(dist.source_lengths[b]), 3)
        log_z = _log_z(truth)
        scale = float(scales[b])
        torch.testing.assert_close(dist.log_partition[b].double(), log_z,
                                   **_tolerance(dtype, scale))
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for z, score in truth.items():
            for t, state in enumerate(z):
                expected[t, min(state, 3)] += math.exp(score - log_z)
        atol = 1e-4 if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(dist.attention[b].double(), expected, rtol=0, atol=atol)


def test_gradients_pass_gradcheck_through_every_route():
    generator = torch.Generator().manual_seed(2)
    scales = torch.tensor([1.0, 60.0, 3000.0], dtype=torch.float64).view(3, 1, 1)
    emissions = (scales * torch.randn(3, 3, 4, generator=generator, dtype=torch.float64))
    emissions.requires_grad_(True)
    jumps = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)

    def log_z(jumps, emissions):
        return HMMAlignment(jumps, emissions, null_probability=0.3).log_partition

    assert _routes(HMMAlignment(jumps, emissions, null_probability=0.3)) == [
        torch.float64, torch.float64, None]
    assert torch.autograd.gradcheck(log_z, (jumps, emissions))


def test_expand_broadcasts_the_fast_path():
    dist = _random_chain(1.0, torch.float64, True, batch=2)
    expanded = dist.expand((3, 2))
    torch.testing.assert_close(expanded.log_partition, dist.log_partition.expand(3, 2))
    torch.testing.assert_close(expanded.attention, dist.attention.expand(3, 2, -1, -1))
    assert expanded.potentials.shape[:2] == (3, 2)


@pytest.mark.parametrize("scale", [1.0, 3000.0])
def test_attention_works_under_inference_mode_on_every_route(scale):
    generator = torch.Generator().manual_seed(3)
    emissions = scale * torch.randn(2, 4, 6, generator=generator)
    expected = HMMAlignment(torch.zeros(5), emissions, null_probability=0.2).attention
    with torch.inference_mode():
        found = HMMAlignment(torch.zeros(5), emissions, null_probability=0.2).attention
    torch.testing.assert_close(found, expected)
