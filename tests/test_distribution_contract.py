"""One contract, every alignment distribution: what torch.distributions and Pyro expect.

Each distribution class in :mod:`structattn.distributions` is described once by a
:class:`Spec` (how to build it for a batch shape, its event shape, where its attention
normalises); every test below runs over all of them.  Covered: ``expand`` then
``sample``/``log_prob`` shapes, values broadcast against size-1 batch dims, Pyro's ``mask()``
and ``to_event``, ``infer_shapes`` (where a class defines it), pickling, an empty batch,
non-contiguous and expanded parameters, and ``.attention``'s shape and simplex.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from test_second_order import hessian_matches_differences_of_the_gradient

import structattn.distributions as sd

DTYPE = torch.float64


@dataclass(frozen=True)
class Spec:
    """How to build one distribution class for the contract tests.

    ``params(batch_shape)`` gives the constructor's tensor arguments, ``build(**params)`` the
    distribution; ``event_shape`` its event shape; ``attention_tail`` the trailing shape of
    ``.attention`` after the batch shape (for per-query classes the queries are part of the
    batch, so the tail is ``(keys,)``); ``infer_args`` names the arguments
    ``infer_shapes`` takes (None: the class does not define it).
    """

    name: str
    params: Callable[[tuple[int, ...]], dict[str, torch.Tensor]]
    build: Callable[..., torch.distributions.Distribution]
    event_shape: tuple[int, ...]
    attention_tail: tuple[int, ...]
    infer_args: tuple[str, ...] | None = None
    attention_total: float = 1.0


KEYS, LENGTH, STATES = 4, 4, 3


def _randn(*shape):
    return torch.randn(*shape, dtype=DTYPE)


SPECS = [
    Spec("categorical", lambda b: {"logits": _randn(*b, KEYS)},
         lambda **p: sd.CategoricalAlignment(**p), (), (KEYS,), ("logits",)),
    Spec("sparsemax", lambda b: {"scores": _randn(*b, KEYS)},
         lambda **p: sd.SparsemaxAlignment(**p, alpha=1.5), (), (KEYS,), ("scores",)),
    Spec("relaxed", lambda b: {"logits": _randn(*b, KEYS)},
         lambda **p: sd.RelaxedAlignment(**p, temperature=0.7, straight_through=False),
         (KEYS,), (KEYS,), ("logits",)),
    Spec("linear_chain", lambda b: {"log_potentials": _randn(*b, LENGTH - 1, STATES, STATES)},
         lambda **p: sd.LinearChainCRF(**p), (LENGTH,), (LENGTH, STATES), ("log_potentials",)),
    Spec("segmentation", lambda b: {"scores": _randn(*b, LENGTH)},
         lambda **p: sd.segmentation_crf(**p), (LENGTH,), (LENGTH, 2)),
    Spec("segmentation_attention", lambda b: {"scores": _randn(*b, KEYS)},
         lambda **p: sd.SegmentationAlignment(**p), (KEYS,), (KEYS,), None, 2.0),
    Spec("projective", lambda b: {"arc_scores": _randn(*b, LENGTH, LENGTH)},
         lambda **p: sd.ProjectiveDependencyCRF(**p), (LENGTH,), (LENGTH, LENGTH),
         ("arc_scores",)),
    Spec("non_projective", lambda b: {"arc_scores": _randn(*b, LENGTH, LENGTH)},
         lambda **p: sd.NonProjectiveDependencyCRF(**p), (LENGTH,), (LENGTH, LENGTH),
         ("arc_scores",)),
    Spec("monotonic",
         lambda b: {"alignment_logits": _randn(*b, LENGTH, KEYS),
                    "emission_log_likelihoods": _randn(*b, LENGTH, KEYS)},
         lambda **p: sd.MonotonicAlignment(**p), (LENGTH,), (LENGTH, KEYS),
         ("alignment_logits", "emission_log_likelihoods")),
]
SPECS.append(
    Spec("hmm",
         lambda b: {"jump_scores": _randn(*b, 5),
                    "emission_log_likelihoods": _randn(*b, LENGTH, KEYS)},
         lambda **p: sd.HMMAlignment(**p), (LENGTH,), (LENGTH, KEYS),
         ("jump_scores", "emission_log_likelihoods"))
)
SPECS.append(
    Spec("jump",
         lambda b: {"alignment_logits": _randn(*b, LENGTH, KEYS), "jump_scores": _randn(*b, 5),
                    "emission_log_likelihoods": _randn(*b, LENGTH, KEYS)},
         lambda **p: sd.JumpAlignment(**p), (LENGTH,), (LENGTH, KEYS),
         ("alignment_logits", "jump_scores", "emission_log_likelihoods"))
)
IDS = [spec.name for spec in SPECS]


def test_every_distribution_class_has_a_spec():
    """A new distribution class must join the contract."""
    covered = {type(spec.build(**spec.params((2,)))) for spec in SPECS}
    exported = {
        obj for obj in vars(sd).values()
        if isinstance(obj, type) and issubclass(obj, torch.distributions.Distribution)
        and not getattr(obj, "__abstractmethods__", None)
    }
    assert exported <= covered, exported - covered


@pytest.fixture(params=SPECS, ids=IDS)
def spec(request):
    return request.param


def _sample_shape(spec, sample_shape, batch_shape):
    return torch.Size(sample_shape) + torch.Size(batch_shape) + torch.Size(spec.event_shape)


def test_expand_then_sample_and_log_prob_have_the_expanded_shapes(spec):
    dist = spec.build(**spec.params((3,)))
    big = dist.expand((2, 3))
    assert big.batch_shape == (2, 3) and big.event_shape == spec.event_shape
    value = big.sample()
    assert value.shape == _sample_shape(spec, (), (2, 3))
    assert big.log_prob(value).shape == (2, 3)
    values = big.sample((4,))
    assert values.shape == _sample_shape(spec, (4,), (2, 3))
    assert big.log_prob(values).shape == (4, 2, 3)
    # every expanded copy is the original distribution
    single = dist.log_prob(values[:, 1])
    torch.testing.assert_close(big.log_prob(values)[:, 1], single)


def test_log_prob_broadcasts_a_value_against_size_one_batch_dims(spec):
    dist = spec.build(**spec.params((1,)))
    value = spec.build(**spec.params((5,))).sample()
    log_prob = dist.log_prob(value)
    assert log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, dist.expand((5,)).log_prob(value))
    for row in range(5):
        torch.testing.assert_close(log_prob[row : row + 1], dist.log_prob(value[row : row + 1]))


def test_pyro_mask_zeroes_masked_log_probs(spec):
    dist = spec.build(**spec.params((3,)))
    keep = torch.tensor([True, False, True])
    value = dist.sample()
    masked = dist.mask(keep).log_prob(value)
    assert masked.shape == (3,)
    assert masked[1] == 0
    torch.testing.assert_close(masked[keep], dist.log_prob(value)[keep])


def test_to_event_moves_batch_dims_into_the_event(spec):
    dist = spec.build(**spec.params((2, 3)))
    joint = dist.to_event(1)
    assert joint.batch_shape == (2,) and joint.event_shape == (3,) + spec.event_shape
    value = joint.sample()
    torch.testing.assert_close(joint.log_prob(value), dist.log_prob(value).sum(-1))


def test_infer_shapes_agrees_with_the_constructed_distribution(spec):
    if spec.infer_args is None:
        pytest.skip(f"{spec.name} is built by a function, not a class with infer_shapes")
    params = spec.params((2, 3))
    dist = spec.build(**params)
    shapes = {name: params[name].shape for name in spec.infer_args}
    assert type(dist).infer_shapes(**shapes) == (dist.batch_shape, dist.event_shape)


def test_pickled_distribution_gives_the_same_log_probs(spec):
    dist = spec.build(**spec.params((2, 3)))
    value = dist.sample()
    copy = pickle.loads(pickle.dumps(dist))
    assert type(copy) is type(dist) and copy.batch_shape == dist.batch_shape
    torch.testing.assert_close(copy.log_prob(value), dist.log_prob(value))


def test_empty_batch_gives_empty_results(spec):
    dist = spec.build(**spec.params((0,)))
    assert dist.batch_shape == (0,)
    value = dist.sample()
    assert value.shape == _sample_shape(spec, (), (0,))
    assert dist.log_prob(value).shape == (0,)
    assert dist.attention.shape == (0,) + spec.attention_tail
    assert dist.entropy().shape == (0,)


def _non_contiguous(tensor):
    """Same values, transposed strides (or a strided slice for vectors)."""
    if tensor.dim() >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([tensor, tensor], -1)[..., 0]


def test_non_contiguous_parameters_give_the_same_distribution(spec):
    params = spec.params((2, 3))
    strided = {name: _non_contiguous(value) for name, value in params.items()}
    assert not any(value.is_contiguous() for value in strided.values())
    dist, twin = spec.build(**params), spec.build(**strided)
    value = dist.sample()
    torch.testing.assert_close(twin.log_prob(value), dist.log_prob(value))
    torch.testing.assert_close(twin.attention, dist.attention)
    torch.testing.assert_close(twin.entropy(), dist.entropy())


def test_expanded_parameters_equal_repeated_parameters(spec):
    params = spec.params((1, 3))
    expanded = {name: value.expand(4, *value.shape[1:]) for name, value in params.items()}
    repeated = {name: value.expand(4, *value.shape[1:]).clone() for name, value in params.items()}
    dist, twin = spec.build(**expanded), spec.build(**repeated)
    assert dist.batch_shape == (4, 3)
    value = twin.sample()
    torch.testing.assert_close(dist.log_prob(value), twin.log_prob(value))
    torch.testing.assert_close(dist.attention, twin.attention)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_has_the_documented_shape_and_lies_on_the_simplex(spec, dtype):
    params = {name: value.to(dtype) for name, value in spec.params((2, 3)).items()}
    attention = spec.build(**params).attention
    assert attention.shape == (2, 3) + spec.attention_tail
    assert attention.dtype == dtype
    assert (attention >= 0).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    sums = attention.sum(-1)
    # each query's weights sum to one (to ``attention_total`` where the class documents a
    # rescaling, as segmentation attention does after Kim et al.)
    expected = torch.full_like(sums, spec.attention_total)
    torch.testing.assert_close(sums, expected, atol=tolerance * spec.attention_total, rtol=0)


def test_conditioning_on_a_zero_table_gives_back_the_same_distribution(spec):
    """Exact inference rebuilds a prior with the table added: a table of zeros must leave every
    parameter in place (a subclass rebuilt through its parent's constructor would lose its
    own, e.g. a chain's jump scores)."""
    from structattn.infer import marginal_log_likelihood, posterior

    dist = spec.build(**spec.params((2,)))
    table = torch.zeros_like(dist.attention)
    try:
        conditioned = posterior(dist, table)
    except ValueError as err:
        assert "no conditioner" in str(err)
        return
    torch.testing.assert_close(conditioned, dist.attention)
    torch.testing.assert_close(marginal_log_likelihood(dist, table),
                               torch.zeros_like(marginal_log_likelihood(dist, table)))


def test_exact_inference_refuses_a_bad_emission_table_by_name(spec):
    """Every prior with a conditioner: a NaN, +inf or integer table, or a mask that does not
    fit the queries, is a ValueError naming it; a table that rules out every alignment has
    log p(y | x) = -inf, and its posterior, undefined, is refused rather than NaN."""
    from structattn.infer import marginal_log_likelihood, posterior

    dist = spec.build(**spec.params((2,)))
    table = torch.zeros_like(dist.attention)
    try:
        posterior(dist, table)
    except ValueError as err:
        assert "no conditioner" in str(err)
        return
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="emission_log_prob contains NaN or"):
            marginal_log_likelihood(dist, table.index_fill(-1, torch.tensor([0]), bad))
    with pytest.raises(ValueError, match="emission_log_prob must be a floating"):
        posterior(dist, table.long())
    with pytest.raises(ValueError, match="mask"):
        posterior(dist, table, mask=torch.ones(table.shape[:-2] + (7,), dtype=torch.bool))
    impossible = torch.full_like(table, float("-inf"))
    assert bool((marginal_log_likelihood(dist, impossible) == float("-inf")).any())
    with pytest.raises(ValueError, match="rules out every alignment"):
        posterior(dist, impossible)


#: the classes that torch.jit.trace (and Pyro's Jit* ELBOs) must support; any other may instead
#: refuse while tracing, by name
TRACEABLE = {"categorical", "sparsemax", "relaxed"}


def test_a_trace_replays_eagers_answers_on_other_parameters_or_refuses_by_name(spec):
    """A trace freezes the Python decisions taken on the values it was made with: replayed on
    parameters 30x larger (other supports, other branches) it must still give eager's
    ``log_prob`` and ``.attention``, or the class must refuse to be traced."""
    import warnings

    first = spec.params((2,))
    other = {name: 30 * tensor for name, tensor in spec.params((2,)).items()}
    names = sorted(first)
    value = spec.build(**other).sample()

    def fn(value, *tensors):
        dist = spec.build(**dict(zip(names, tensors, strict=True)))
        return dist.log_prob(value), dist.attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the frozen validation checks
        try:
            traced = torch.jit.trace(fn, (value, *(first[n] for n in names)), check_trace=False)
        except RuntimeError as error:
            assert "cannot be recorded by torch.jit.trace" in str(error), error
            assert spec.name not in TRACEABLE
            return
    replayed = traced(value, *(other[n] for n in names))
    eager = fn(value, *(other[n] for n in names))
    for got, expected in zip(replayed, eager, strict=True):
        torch.testing.assert_close(got, expected)


#: constructors whose signature is not the built class's own
CONSTRUCTORS = {"segmentation": sd.segmentation_crf}
#: real-valued arguments that the specs leave at their defaults, and a valid value of each
OPTIONAL_VALUES = {
    "probs": lambda b: torch.rand(*b, KEYS, dtype=DTYPE) + 0.1,
    "logits": lambda b: _randn(*b, KEYS),
    "initial_potentials": lambda b: _randn(*b, STATES),
    "transition": lambda b: _randn(2, 2),
    "null_probability": lambda b: 0.3,
    "alpha": lambda b: 1.5,
    "smoothing": lambda b: 0.1,
    "temperature": lambda b: 0.7,
    "scale": lambda b: 2.0,
    "emission_log_likelihoods": lambda b: _randn(*b, LENGTH, KEYS),
}
#: arguments that are not real-valued (flags, masks, lengths, sizes)
NOT_REAL = {"mask", "lengths", "target_lengths", "source_lengths", "max_jump", "multiroot",
            "straight_through", "validate_args"}
#: arguments that exclude one another (exactly one of them is given)
EXCLUSIVE = {"probs": "logits", "logits": "scores"}


def _real_arguments(spec):
    import inspect

    made = CONSTRUCTORS.get(spec.name) or type(spec.build(**spec.params((2,))))
    target = made if inspect.isfunction(made) else made.__init__
    names = [p.name for p in inspect.signature(target).parameters.values()
             if p.name != "self" and p.name not in NOT_REAL]
    return made, names


def test_nan_in_any_real_argument_is_a_value_error_naming_it(spec):
    """Range checks written as 'reject outside [a, b]' let NaN through (it compares False
    with everything): every real-valued argument of every class, given a NaN, must be refused
    by name instead of turning into NaN probabilities."""
    made, names = _real_arguments(spec)
    for name in names:
        params = spec.params((2,))
        if name in params:
            value = params[name].clone()
            value.view(-1)[0] = float("nan")
        else:
            value = OPTIONAL_VALUES[name]((2,))  # a new argument: add a valid value above
            value = float("nan") if isinstance(value, float) else value.index_fill(
                -1, torch.tensor([0]), float("nan"))
            params.pop(EXCLUSIVE.get(name, ""), None)
            if name == "logits":
                params.pop("scores", None)
        with pytest.raises(ValueError, match=name):
            made(**{**params, name: value})


def test_second_derivatives_of_the_attention_match_differences_of_its_gradient(spec):
    """Every class: the Hessian of ``<w, attention>`` in its first real parameter equals the
    finite differences of the exact gradient (a backward pass that autograd cannot
    differentiate correctly would show here)."""
    params = spec.params((2,))
    name = sorted(params)[0]
    weights = torch.randn_like(spec.build(**params).attention)

    def weighted(value):
        return (spec.build(**{**params, name: value}).attention * weights).sum()

    hessian_matches_differences_of_the_gradient(weighted, params[name])
