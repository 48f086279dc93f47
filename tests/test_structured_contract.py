"""The distribution contract every structured alignment distribution keeps.

Parametrised over the linear chain, monotonic alignment and both dependency CRFs: value
broadcasting like ``Categorical``, ``expand`` then ``log_prob``/``sample`` shapes, Pyro's
``mask()`` and ``to_event``, pickling, empty batches, non-contiguous and expanded parameters,
no graph under ``no_grad``, and the caller's tensors left alone.
"""

import pickle

import pytest
import torch

from structattn.distributions import (
    JumpAlignment,
    LinearChainCRF,
    MonotonicAlignment,
    NonProjectiveDependencyCRF,
    ProjectiveDependencyCRF,
)

torch.set_num_threads(1)


def chain(potentials):
    return LinearChainCRF(potentials)


def monotonic(potentials):
    return MonotonicAlignment(potentials, emission_log_likelihoods=0.5 * potentials, max_jump=2)


def jump(potentials):
    jumps = torch.linspace(-1.0, 1.0, 5, dtype=potentials.dtype)
    return JumpAlignment(potentials, jumps, emission_log_likelihoods=0.5 * potentials)


def projective(potentials):
    return ProjectiveDependencyCRF(potentials)


def nonprojective(potentials):
    return NonProjectiveDependencyCRF(potentials)


#: constructor and the event part of its potentials' shape
STRUCTURES = {
    "chain": (chain, (3, 3, 3)),
    "monotonic": (monotonic, (4, 5)),
    "jump": (jump, (4, 5)),
    "projective": (projective, (4, 4)),
    "nonprojective": (nonprojective, (4, 4)),
}


@pytest.fixture(params=list(STRUCTURES))
def structure(request):
    return STRUCTURES[request.param]


def potentials_of(event, batch=(3,), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(batch) + tuple(event), generator=generator, dtype=dtype)


def test_log_prob_broadcasts_a_value_against_size_one_batch_dims(structure):
    make, event = structure
    dist = make(potentials_of(event, batch=(1,)))
    value = dist.sample((5,)).squeeze(1)  # (5, *event): enlarges batch (1,) to (5,)
    log_prob = dist.log_prob(value)
    assert log_prob.shape == (5,)
    expanded = make(potentials_of(event, batch=(1,)).expand((5,) + event))
    torch.testing.assert_close(log_prob, expanded.log_prob(value))


def test_pyro_expand_to_size_one_then_log_prob(structure):
    make, event = structure
    dist = make(potentials_of(event, batch=(1,))).expand(torch.Size([1]))
    value = dist.sample((4,)).squeeze(1)
    assert dist.log_prob(value).shape == (4,)
    assert dist.log_prob(value.unsqueeze(1)).shape == (4, 1)


def test_expand_then_sample_and_log_prob_shapes(structure):
    make, event = structure
    dist = make(potentials_of(event))
    expanded = dist.expand(torch.Size([2, 3]))
    event_shape = dist.event_shape
    assert expanded.batch_shape == (2, 3) and expanded.event_shape == event_shape
    assert expanded.sample().shape == (2, 3) + event_shape
    draws = expanded.sample((4,))
    assert draws.shape == (4, 2, 3) + event_shape
    log_prob = expanded.log_prob(draws)
    assert log_prob.shape == (4, 2, 3)
    torch.testing.assert_close(log_prob[:, 1], dist.log_prob(draws[:, 1]))
    assert expanded.log_partition.shape == (2, 3) and expanded.entropy().shape == (2, 3)


def test_a_value_that_does_not_broadcast_raises_value_error(structure):
    make, event = structure
    dist = make(potentials_of(event))
    value = dist.sample((2,))
    with pytest.raises(ValueError, match="(?i)value"):
        dist.log_prob(value[:, :2].repeat(1, 2, *([1] * len(dist.event_shape))))


def test_mask_zeroes_log_prob_of_masked_batch_entries(structure):
    make, event = structure
    dist = make(potentials_of(event))
    value = dist.sample()
    masked = dist.mask(torch.tensor([True, False, True]))
    log_prob = masked.log_prob(value)
    assert log_prob[1] == 0
    torch.testing.assert_close(log_prob[[0, 2]], dist.log_prob(value)[[0, 2]])


def test_to_event_sums_log_prob_over_the_batch(structure):
    make, event = structure
    dist = make(potentials_of(event))
    joint = dist.to_event(1)
    assert joint.batch_shape == () and joint.event_shape == (3,) + dist.event_shape
    value = dist.sample()
    torch.testing.assert_close(joint.log_prob(value), dist.log_prob(value).sum())


def test_pickling_round_trip_keeps_every_result(structure):
    make, event = structure
    dist = make(potentials_of(event))
    copy = pickle.loads(pickle.dumps(dist))
    assert type(copy) is type(dist) and copy.batch_shape == dist.batch_shape
    torch.testing.assert_close(copy.log_partition, dist.log_partition)
    torch.testing.assert_close(copy.marginals, dist.marginals)
    torch.testing.assert_close(copy.argmax, dist.argmax)


def test_empty_batch_gives_empty_results_for_every_method(structure):
    make, event = structure
    dist = make(potentials_of(event, batch=(0,)))
    event_shape = dist.event_shape
    assert dist.batch_shape == (0,)
    assert dist.log_partition.shape == (0,)
    assert dist.marginals.shape == dist.potentials.shape
    assert dist.attention.shape[0] == 0
    assert dist.argmax.shape == (0,) + event_shape
    assert dist.sample().shape == (0,) + event_shape
    assert dist.sample((2,)).shape == (2, 0) + event_shape
    assert dist.entropy().shape == (0,)
    value = torch.zeros((0,) + event_shape, dtype=torch.long)
    assert dist.log_prob(value).shape == (0,)
    nested = make(potentials_of(event, batch=(2, 0)))
    assert nested.log_partition.shape == (2, 0) and nested.argmax.shape == (2, 0) + event_shape


def layouts(event, seed=1):
    """The same potentials in other memory layouts: transposed, sliced, and expanded."""
    base = potentials_of(event, seed=seed)
    dims = tuple(range(base.dim()))
    transposed = base.permute(dims[::-1]).contiguous().permute(dims[::-1])
    sliced = torch.cat([base, base], -1)[..., : event[-1]]
    expanded_source = potentials_of(event, batch=(1,), seed=seed)
    return base, {
        "transposed": transposed,
        "sliced": sliced,
        "expanded": (base, expanded_source.expand((3,) + tuple(event))),
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_potentials_work_for_every_method(structure, layout):
    make, event = structure
    base, variants = layouts(event)
    tensor = variants[layout]
    if layout == "expanded":
        base, tensor = tensor[1].contiguous(), tensor[1]
    assert not tensor.is_contiguous()
    torch.testing.assert_close(tensor, base)
    ours, reference = make(tensor), make(base)
    torch.testing.assert_close(ours.log_partition, reference.log_partition)
    torch.testing.assert_close(ours.marginals, reference.marginals)
    torch.testing.assert_close(ours.attention, reference.attention)
    torch.testing.assert_close(ours.entropy(), reference.entropy())
    torch.testing.assert_close(ours.argmax, reference.argmax)
    value = reference.sample((2,))
    torch.testing.assert_close(ours.log_prob(value), reference.log_prob(value))
    assert ours.sample((2,)).shape == value.shape


def test_no_graph_under_no_grad_and_the_callers_tensor_is_untouched(structure):
    make, event = structure
    potentials = potentials_of(event).requires_grad_(True)
    before = potentials.detach().clone()
    with torch.no_grad():
        dist = make(potentials)
        results = [dist.log_partition, dist.marginals, dist.attention, dist.entropy()]
        results.append(dist.log_prob(dist.sample()))
    assert all(result.grad_fn is None for result in results)
    dist = make(potentials)
    dist.marginals, dist.argmax, dist.sample((2,)), dist.entropy()
    assert potentials.grad is None and potentials.requires_grad
    torch.testing.assert_close(potentials.detach(), before, rtol=0, atol=0)


def test_gradients_flow_from_log_partition_marginals_and_entropy(structure):
    make, event = structure
    potentials = potentials_of(event).requires_grad_(True)
    dist = make(potentials)
    loss = dist.log_partition.sum() + (dist.marginals**2).sum() + dist.entropy().sum()
    (grad,) = torch.autograd.grad(loss, potentials)
    assert grad.shape == potentials.shape and torch.isfinite(grad).all()
