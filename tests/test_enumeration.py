"""gather_along, broadcast_cat and observe_alignment_emission under real enumeration."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import TraceEnum_ELBO

import structattn as sa
from structattn.infer.enumeration import (
    broadcast_cat,
    gather_along,
    observe_alignment_emission,
)


def _no_guide(*args):
    pass


def test_gather_along_reads_any_axis_at_sampled_indices():
    tensor = torch.randn(4, 5, 6)
    index = torch.randint(0, 5, (4,))
    expected = torch.stack([tensor[b, index[b]] for b in range(4)])
    torch.testing.assert_close(gather_along(tensor, index, dim=1), expected)
    index = torch.randint(0, 6, (4, 5))
    expected = tensor.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_along(tensor, index, dim=-1), expected)


def test_gather_along_aligns_batch_axes_on_the_right_when_batch_equals_queries():
    # batch size == number of queries: naive indexing would read the wrong axis
    table = torch.randn(3, 3, 4)
    z = torch.randint(0, 4, (2, 3, 3))  # a leading sample dim
    out = gather_along(table, z, dim=-1)
    assert out.shape == (2, 3, 3)
    for k in range(2):
        for b in range(3):
            for q in range(3):
                assert out[k, b, q] == table[b, q, z[k, b, q]]


def test_gather_along_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        gather_along(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), dim=2)
    with pytest.raises(ValueError, match="index"):
        gather_along(torch.randn(2, 3), torch.zeros(2), dim=1)
    with pytest.raises(ValueError, match="broadcast"):
        gather_along(torch.randn(2, 3), torch.zeros(4, dtype=torch.long), dim=1)


def test_broadcast_cat_joins_an_enumerated_context_with_a_plain_tensor():
    hidden = torch.randn(3, 5, 2)
    context = torch.randn(4, 1, 3, 5, 7)
    out = broadcast_cat([hidden, context], dim=-1)
    assert out.shape == (4, 1, 3, 5, 9)
    torch.testing.assert_close(out[2, 0, ..., :2], hidden)
    torch.testing.assert_close(out[2, 0, ..., 2:], context[2, 0])
    with pytest.raises(ValueError, match="dim"):
        broadcast_cat([hidden, context], dim=0)
    with pytest.raises(ValueError, match="broadcast"):
        broadcast_cat([hidden, torch.randn(2, 5, 1)], dim=-1)


def _markov_model(start, transition, emissions, lengths, seen):
    """A batch of HMM chains: transition row read at the enumerated previous state."""
    batch, steps, _ = emissions.shape
    mask = torch.arange(steps) < lengths.unsqueeze(-1)
    with pyro.plate("batch", batch, dim=-1):
        z = None
        for t in pyro.markov(range(steps)):
            logits = start if t == 0 else gather_along(transition, z, dim=-2)
            with pyro.poutine.mask(mask=mask[:, t]):
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits),
                                infer={"enumerate": "parallel"})
            observe_alignment_emission(f"y_{t}", emissions[:, t], z, mask[:, t])
            seen.append(tuple(z.shape))


def _forward_algorithm(start, transition, emissions, length):
    alpha = torch.log_softmax(start, -1) + emissions[0]
    for t in range(1, length):
        step = torch.log_softmax(transition, -1) + emissions[t].unsqueeze(-2)
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + step, -2)
    return torch.logsumexp(alpha, -1)


@pytest.mark.parametrize("batch", [3, 4])
def test_transition_read_at_the_enumerated_previous_state_gives_the_forward_algorithm(batch):
    # batch == steps (4) is the case where naive batch indexing silently reads the wrong axis
    steps, states = 4, 3
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(batch, states, generator=generator, dtype=torch.float64)
    transition = torch.randn(batch, states, states, generator=generator, dtype=torch.float64)
    emissions = torch.randn(batch, steps, states, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3, 1][:batch])
    seen = []
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        _markov_model, _no_guide, start, transition, emissions, lengths, seen)
    expected = sum(_forward_algorithm(start[b], transition[b], emissions[b], int(lengths[b]))
                   for b in range(batch))
    assert -loss == pytest.approx(float(expected), abs=1e-8)  # masked steps add nothing
    assert any(len(shape) >= 3 for shape in seen)  # really enumerated, two alternating dims


def _emission_model(table, mask, naive_log_t=None, target=None, source=None):
    batch, queries, keys = table.shape
    prior = sa.CategoricalAlignment(logits=torch.zeros(batch, queries, keys))
    with pyro.plate("batch", batch, dim=-2), pyro.plate("queries", queries, dim=-1):
        z = sa.infer.sample_alignment("z", prior, estimator="enum", mask=mask)
        if naive_log_t is None:
            observe_alignment_emission("y", table, z, mask)
        else:
            words = sa.infer.gather(source.unsqueeze(-1), z).squeeze(-1)
            with pyro.poutine.mask(mask=mask):
                pyro.sample("y", dist.Categorical(logits=naive_log_t[words]), obs=target)


def test_emission_helper_gives_the_naive_pattern_s_marginal_likelihood_and_gradient():
    batch, queries, keys, vocabulary = 3, 3, 4, 6
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(vocabulary, vocabulary, generator=generator, requires_grad=True)
    log_t = torch.log_softmax(logits, -1)
    source = torch.randint(0, vocabulary, (batch, keys), generator=generator)
    target = torch.randint(0, vocabulary, (batch, queries), generator=generator)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    table = log_t[source.unsqueeze(1), target.unsqueeze(2)]
    fast = elbo.differentiable_loss(_emission_model, _no_guide, table, mask)
    (fast_grad,) = torch.autograd.grad(fast, logits)
    naive = elbo.differentiable_loss(_emission_model, _no_guide, table, mask, logits, target,
                                     source)
    (naive_grad,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(fast, naive)
    torch.testing.assert_close(fast_grad, naive_grad)
    # and both are the hand-written IBM1-style marginal likelihood
    per_query = torch.logsumexp(table, -1) - torch.log(torch.tensor(float(keys)))
    torch.testing.assert_close(-fast, (per_query * mask).sum())


def test_emission_helper_returns_the_table_read_at_a_sampled_alignment():
    table = torch.randn(2, 3, 4)
    z = torch.tensor([[0, 3, 1], [2, 2, 0]])
    trace = pyro.poutine.trace(observe_alignment_emission).get_trace("y", table, z)
    expected = table.gather(-1, z.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(trace.nodes["y"]["fn"].log_factor, expected)
    with pytest.raises(ValueError, match="mask"):
        observe_alignment_emission("y", table, z, torch.ones(2, 3))


@settings(max_examples=40, deadline=None)
@given(
    head=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    size=st.integers(1, 4),
    tail=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    extra=st.integers(0, 2),
    seed=st.integers(0, 1000),
)
def test_gather_along_matches_indexing_element_by_element(head, size, tail, extra, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(*head, size, *tail, generator=generator)
    index = torch.randint(0, size, (2,) * extra + tuple(head), generator=generator)
    out = gather_along(tensor, index, dim=len(head))
    assert out.shape == index.shape + tuple(tail)
    for position in itertools.product(*(range(n) for n in index.shape)):
        where = position[len(position) - len(head):] if head else ()
        expected = tensor[where + (int(index[position]),)]
        torch.testing.assert_close(out[position], expected)


def test_gather_along_at_pyro_enumerated_support_is_a_view_with_the_same_values():
    table = torch.randn(2, 3, 4)

    def model():
        with pyro.plate("b", 2, dim=-2), pyro.plate("q", 3, dim=-1):
            z = pyro.sample("z", dist.Categorical(logits=torch.zeros(4)),
                            infer={"enumerate": "parallel"})
        return z, gather_along(table, z, dim=-1)

    z, out = pyro.poutine.enum(model, first_available_dim=-3)()
    assert z.shape == (4, 1, 1) and out.shape == (4, 2, 3)
    assert out.data_ptr() == table.data_ptr()  # no copy
    torch.testing.assert_close(out, table.movedim(-1, 0))
