"""Dependency CRFs at every score scale: brute-force enumeration, adversarial scores, long
sentences, impossible structures and the distribution contract (issue 9, items 1, 5-8)."""

import functools
import itertools

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree import all_trees

from structattn.distributions import tree as tree_module
from structattn.distributions.tree import NonProjectiveDependencyCRF, ProjectiveDependencyCRF

torch.set_num_threads(1)

CLASSES = [NonProjectiveDependencyCRF, ProjectiveDependencyCRF]
CASES = [(cls, multiroot) for cls in CLASSES for multiroot in (False, True)]
DTYPES = [torch.float32, torch.float64]


@functools.cache
def trees_of(size, multiroot, projective):
    return all_trees(size, multiroot, projective)


def brute_force(scores, length, multiroot, projective):
    """Exact log Z, marginals ``(N, N)`` and best tree score of one sentence, in float64."""
    scores = scores.double()[:length, :length]
    trees = trees_of(length, multiroot, projective)
    dependents = torch.arange(length)
    totals = scores[trees, dependents].sum(-1)
    log_z = torch.logsumexp(totals, 0)
    probabilities = (totals - log_z).exp()
    marginals = torch.zeros(length, length, dtype=torch.float64)
    marginals.index_put_(
        (trees.flatten(), dependents.repeat(len(trees))),
        probabilities.repeat_interleave(length),
        accumulate=True,
    )
    return log_z, marginals, totals.max()


def tolerance(dtype, log_z):
    """Absolute tolerance on log Z (relative to its size) and on marginals."""
    if dtype == torch.float64:
        return 1e-9 * max(1.0, abs(float(log_z))), 1e-9
    return 2e-6 * max(1.0, abs(float(log_z))), 2e-6


def check_against_brute_force(cls, multiroot, scores, lengths):
    crf = cls(scores, lengths=lengths, multiroot=multiroot)
    log_z, marginals = crf.partition, crf.marginals
    assert log_z.dtype == scores.dtype and marginals.dtype == scores.dtype
    leaf = scores.clone().requires_grad_(True)
    recorded = cls(leaf, lengths=lengths, multiroot=multiroot).marginals
    (gradient,) = torch.autograd.grad(
        cls(leaf, lengths=lengths, multiroot=multiroot).partition.sum(), leaf
    )
    for index, length in enumerate(lengths.tolist()):
        exact_z, exact_marginals, _ = brute_force(
            scores[index], length, multiroot, cls is ProjectiveDependencyCRF
        )
        z_tol, m_tol = tolerance(scores.dtype, exact_z)
        assert abs(float(log_z[index]) - float(exact_z)) <= z_tol
        for found in (marginals, recorded.detach(), gradient):
            torch.testing.assert_close(
                found[index, :length, :length].double(), exact_marginals, atol=m_tol, rtol=0
            )
            assert bool((found[index, length:] == 0).all())
            assert bool((found[index, :, length:] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("cls, multiroot", CASES)
def test_partition_and_marginals_match_brute_force_at_every_scale(cls, multiroot, scale, dtype):
    generator = torch.Generator().manual_seed(int(scale) + 7 * multiroot)
    scores = (scale * torch.randn(6, 5, 5, generator=generator, dtype=torch.float64)).to(dtype)
    check_against_brute_force(cls, multiroot, scores, torch.tensor([5, 5, 5, 4, 3, 1]))


def cycle_scores(successor, low=-40.0):
    """Every dependent's one good head is ``successor[d]`` (0), every other arc ``low``."""
    size = len(successor)
    scores = torch.full((size, size), low, dtype=torch.float64)
    scores[torch.tensor(successor), torch.arange(size)] = 0.0
    return scores


ADVERSARIAL = {
    "one 5-cycle of best heads": cycle_scores([1, 2, 3, 4, 0]),
    "two cycles of best heads": cycle_scores([1, 0, 3, 4, 2]),
    "best heads form a cycle, far below": cycle_scores([1, 2, 0, 4, 3], low=-300.0),
    "best heads form a tree": cycle_scores([0, 0, 1, 2, 3]),
    "every word prefers the root": cycle_scores([0, 1, 2, 3, 4]),
    "all ties": torch.zeros(5, 5, dtype=torch.float64),
    "scale 100 with a cycle": 100
    * torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("cls, multiroot", CASES)
def test_adversarial_scores_match_brute_force(cls, multiroot, name, dtype):
    scores = ADVERSARIAL[name].to(dtype).unsqueeze(0).repeat(2, 1, 1)
    check_against_brute_force(cls, multiroot, scores, torch.tensor([5, 4]))


@given(
    successor=st.lists(st.integers(0, 4), min_size=5, max_size=5),
    low=st.floats(1.0, 600.0),
    multiroot=st.booleans(),
    float64=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_one_good_head_per_word_matches_brute_force(successor, low, multiroot, float64):
    # the best heads form any functional graph (cycles, self-roots); every other arc is far
    # below: the Laplacian is singular to working precision whenever they close a cycle
    dtype = torch.float64 if float64 else torch.float32
    scores = cycle_scores(successor, low=-low).to(dtype).unsqueeze(0)
    check_against_brute_force(NonProjectiveDependencyCRF, multiroot, scores, torch.tensor([5]))


def test_issue_example_with_one_good_head_per_word_is_finite():
    # issue 9: one arc per dependent at 0, the rest at -40 gave log Z = -inf
    scores = cycle_scores([1, 2, 3, 4, 0]).unsqueeze(0)
    crf = NonProjectiveDependencyCRF(scores)
    exact_z, _, _ = brute_force(scores[0], 5, False, False)
    assert torch.isfinite(crf.partition).all()
    torch.testing.assert_close(crf.partition[0], exact_z)


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("cls, multiroot", CASES)
def test_argmax_is_the_best_tree_at_every_scale(cls, multiroot, scale):
    generator = torch.Generator().manual_seed(11)
    scores = scale * torch.randn(6, 5, 5, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([5, 5, 5, 4, 2, 1])
    crf = cls(scores, lengths=lengths, multiroot=multiroot)
    best = crf.argmax
    assert bool(crf.is_tree(best).all())
    for index, length in enumerate(lengths.tolist()):
        _, _, best_score = brute_force(
            scores[index], length, multiroot, cls is ProjectiveDependencyCRF
        )
        torch.testing.assert_close(crf.score(best)[index], best_score)


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_argmax_with_ties_is_a_best_tree(cls, multiroot):
    generator = torch.Generator().manual_seed(12)
    scores = torch.randint(0, 3, (8, 5, 5), generator=generator).double()
    crf = cls(scores, multiroot=multiroot)
    best = crf.argmax
    for index in range(8):
        _, _, best_score = brute_force(scores[index], 5, multiroot, cls is ProjectiveDependencyCRF)
        torch.testing.assert_close(crf.score(best)[index], best_score)


@pytest.mark.parametrize("multiroot", [False, True])
def test_argmax_of_a_long_sentence_is_a_tree_between_simple_bounds(multiroot):
    torch.manual_seed(13)
    crf = NonProjectiveDependencyCRF(torch.randn(1, 300, 300), multiroot=multiroot)
    best = crf.argmax
    assert bool(crf.is_tree(best).all())
    greedy = crf.arc_scores.argmax(-2)
    # the best tree can beat no relaxation: best heads without the tree constraint
    assert float(crf.score(best)[0]) <= float(crf.score(greedy)[0]) + 1e-4
    star = torch.zeros(1, 300, dtype=torch.long)  # every word under word 0, the root's child
    assert float(crf.score(best)[0]) >= float(crf.score(star)[0])


@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 200.0),
    size=st.integers(1, 7),
    multiroot=st.booleans(),
    projective=st.booleans(),
    float64=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_marginals_are_distributions_and_log_z_bounds_the_best_tree(
    seed, scale, size, multiroot, projective, float64
):
    cls = ProjectiveDependencyCRF if projective else NonProjectiveDependencyCRF
    dtype = torch.float64 if float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    scores = (scale * torch.randn(3, size, size, generator=generator, dtype=torch.float64)).to(
        dtype
    )
    lengths = torch.randint(1, size + 1, (3,), generator=generator)
    crf = cls(scores, lengths=lengths, multiroot=multiroot)
    log_z, marginals = crf.partition, crf.marginals
    assert torch.isfinite(log_z).all() and torch.isfinite(marginals).all()
    assert bool((marginals >= 0).all()) and bool((marginals <= 1).all())
    words = torch.arange(size) < lengths.unsqueeze(-1)
    sums = marginals.sum(-2).double()
    torch.testing.assert_close(sums, words.double(), atol=1e-5, rtol=0)
    # log Z is the log of a sum that contains the best tree.  The best tree's score is summed
    # exactly (float64, from the same scores); log Z in the work dtype may be off by a few eps
    # of the scores it sums, which can be far larger than the total (they cancel): at scale
    # 131, float32 scores of a few hundred sum to 2.9.
    exact = cls(scores.double(), lengths=lengths, multiroot=multiroot)
    best = exact.score(crf.argmax)
    eps = torch.finfo(dtype).eps
    slack = 16 * eps * (best.abs() + size * float(scores.abs().max())) + 1e-12
    assert bool((log_z.double() >= best - slack).all())


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_samples_are_trees_with_finite_log_prob_at_scale_100(cls, multiroot):
    torch.manual_seed(0)
    scores = 100 * torch.randn(3, 6, 6)
    crf = cls(scores, lengths=torch.tensor([6, 4, 1]), multiroot=multiroot)
    draws = crf.sample((20,))
    assert bool(crf.is_tree(draws).all())
    assert torch.isfinite(crf.log_prob(draws)).all()


@pytest.mark.parametrize("multiroot", [False, True])
def test_non_projective_sample_frequencies_match_probabilities_at_scale_3(multiroot):
    torch.manual_seed(1)
    scores = 3 * torch.randn(1, 4, 4, dtype=torch.float64)
    crf = NonProjectiveDependencyCRF(scores, multiroot=multiroot)
    draws = crf.sample((6000,))[:, 0]
    _, exact_marginals, _ = brute_force(scores[0], 4, multiroot, False)
    frequencies = torch.nn.functional.one_hot(draws, 4).double().mean(0).T
    assert (frequencies - exact_marginals).abs().max() < 0.03


@pytest.mark.parametrize(
    "size, scale, multiroot",
    [
        (256, 1.0, False),
        (256, 100.0, False),
        (256, 100.0, True),
        (1024, 1.0, True),
        (1024, 100.0, False),
    ],
)
def test_long_float32_sentences_stay_finite_and_normalized(size, scale, multiroot):
    generator = torch.Generator().manual_seed(size)
    scores = scale * torch.randn(1, size, size, generator=generator)
    crf = NonProjectiveDependencyCRF(scores, multiroot=multiroot)
    marginals, log_z = crf.marginals, crf.partition
    assert torch.isfinite(log_z).all() and torch.isfinite(marginals).all()
    assert bool((marginals >= 0).all()) and bool((marginals <= 1).all())
    torch.testing.assert_close(marginals.sum(-2), torch.ones(1, size), atol=1e-5, rtol=0)
    # the highest-scoring tree, by the greedy heads' score, bounds log Z from below
    greedy = crf.score(scores.argmax(-2))
    if bool(crf.is_tree(scores.argmax(-2)).all()):
        assert float(log_z[0]) >= float(greedy[0]) * (1 - 1e-6)


@pytest.mark.parametrize("multiroot", [False, True])
def test_scale_100_float32_matches_float64_at_256_words(multiroot):
    scores = 100 * torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([256, 200])
    crf32 = NonProjectiveDependencyCRF(scores, lengths=lengths, multiroot=multiroot)
    crf64 = NonProjectiveDependencyCRF(scores.double(), lengths=lengths, multiroot=multiroot)
    torch.testing.assert_close(crf32.partition.double(), crf64.partition, rtol=1e-6, atol=0)
    torch.testing.assert_close(crf32.marginals.double(), crf64.marginals, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_scale_1000_does_not_crash(cls, multiroot):
    torch.manual_seed(5)
    scores = 1000 * torch.randn(2, 7, 7)
    crf = cls(scores, multiroot=multiroot)
    marginals = crf.marginals
    assert torch.isfinite(crf.partition).all() and torch.isfinite(marginals).all()
    torch.testing.assert_close(marginals.sum(-2), torch.ones(2, 7), atol=1e-5, rtol=0)
    assert bool(crf.is_tree(crf.argmax).all()) and bool(crf.is_tree(crf.sample((3,))).all())


def count_eliminations(monkeypatch):
    calls = []
    original = tree_module._elimination_log_partition

    def spy(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(tree_module, "_elimination_log_partition", spy)
    return calls


@pytest.mark.parametrize("multiroot", [False, True])
def test_gradcheck_through_the_elimination(monkeypatch, multiroot):
    calls = count_eliminations(monkeypatch)
    scores = (
        30 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ).requires_grad_(True)
    lengths = torch.tensor([4, 3])

    def log_z(x):
        return NonProjectiveDependencyCRF(x, lengths=lengths, multiroot=multiroot).partition

    def marginals(x):
        return NonProjectiveDependencyCRF(x, lengths=lengths, multiroot=multiroot).marginals

    assert torch.autograd.gradcheck(log_z, (scores,))
    assert torch.autograd.gradcheck(marginals, (scores,))
    assert calls, "scale 30 should have taken the elimination path"


def test_elimination_marginals_match_autograd_through_it():
    scores = 50 * torch.randn(
        3, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    lengths = torch.tensor([6, 3, 1])
    for flag in (False, True):
        flags = torch.full((3,), flag)
        leaf = scores.clone().requires_grad_(True)
        log_z = tree_module._elimination_log_partition(leaf, lengths, flags)
        (expected,) = torch.autograd.grad(log_z.sum(), leaf)
        found = tree_module._eliminate_marginals(scores, lengths, flags)
        torch.testing.assert_close(found, expected, atol=1e-12, rtol=0)


def test_projective_float32_marginals_stay_within_one_at_scale_100():
    scores = 100 * torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(10))
    marginals = ProjectiveDependencyCRF(scores).marginals
    assert float(marginals.max()) <= 1 + 1e-5 and float(marginals.min()) >= -1e-5
    torch.testing.assert_close(marginals.sum(-2), torch.ones(4, 16), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ impossible structures
@pytest.mark.parametrize("cls, multiroot", CASES)
def test_log_prob_is_minus_inf_exactly_for_impossible_structures(cls, multiroot):
    size = 4
    scores = torch.randn(1, size, size, dtype=torch.float64)
    crf = cls(scores, multiroot=multiroot, validate_args=False)
    values = torch.tensor(list(itertools.product(range(-1, size + 1), repeat=size)))
    possible = {
        tuple(tree) for tree in trees_of(size, multiroot, cls is ProjectiveDependencyCRF).tolist()
    }
    expected = torch.tensor([tuple(value) in possible for value in values.tolist()])
    log_p = crf.log_prob(values.unsqueeze(1))[:, 0]
    assert torch.equal(torch.isfinite(log_p), expected)
    assert torch.equal(crf.is_tree(values.unsqueeze(1))[:, 0], expected)
    torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "heads, reason",
    [
        ([1, 0, 2], "a cycle"),
        ([0, 1, 1], "two roots"),
        ([0, 0, 3], "a head out of range"),
        ([0, 0, -1], "a negative head"),
    ],
)
def test_impossible_structure_raises_when_validating(cls, heads, reason):
    crf = cls(torch.randn(2, 3, 3), validate_args=True)
    with pytest.raises(ValueError, match="value"):
        crf.log_prob(torch.tensor(heads).expand(2, 3))
    unchecked = cls(crf.arc_scores, validate_args=False).log_prob(torch.tensor(heads))
    assert bool((unchecked == -torch.inf).all()), reason


def test_crossing_tree_is_impossible_only_under_the_projective_crf():
    heads = torch.tensor([2, 3, 2, 2])  # 0 <- 2 crosses 1 <- 3
    scores = torch.randn(1, 4, 4)
    assert torch.isfinite(NonProjectiveDependencyCRF(scores).log_prob(heads)).all()
    projective = ProjectiveDependencyCRF(scores, validate_args=False)
    assert bool((projective.log_prob(heads) == -torch.inf).all())


@pytest.mark.parametrize("cls", CLASSES)
def test_head_in_the_padding_is_impossible(cls):
    crf = cls(torch.randn(1, 4, 4), lengths=torch.tensor([3]), validate_args=False)
    assert bool((crf.log_prob(torch.tensor([1, 1, 3, 0])) == -torch.inf).all())
    # whatever the padded positions hold is ignored
    torch.testing.assert_close(
        crf.log_prob(torch.tensor([1, 1, 1, 3])), crf.log_prob(torch.tensor([1, 1, 1, 0]))
    )


# ------------------------------------------------------------------ distribution contract
@pytest.mark.parametrize("cls", CLASSES)
def test_log_prob_broadcasts_values_over_size_one_batch_dims(cls):
    crf = cls(torch.randn(1, 3, 3))
    values = crf.sample((5, 4)).squeeze(-2)  # (5, 4, 3): batch 4 against batch 1
    log_p = crf.log_prob(values)
    assert log_p.shape == (5, 4)
    torch.testing.assert_close(log_p, crf.expand(torch.Size([4])).log_prob(values))
    assert crf.score(values).shape == (5, 4)


@pytest.mark.parametrize("cls", CLASSES)
def test_pyro_expand_to_a_size_one_dim_then_log_prob(cls):
    crf = cls(torch.randn(3, 4, 4)).expand(torch.Size([2, 1, 3]))
    values = crf.sample()
    assert values.shape == (2, 1, 3, 4)
    wide = values.expand(2, 5, 3, 4)
    assert crf.log_prob(wide).shape == (2, 5, 3)
    assert dist.Independent(crf, 1).log_prob(wide).shape == (2, 5)


def layouts(scores):
    """The same scores as a transposed view, an expanded batch and a strided slice."""
    transposed = scores.transpose(-1, -2).contiguous().transpose(-1, -2)
    expanded = scores[:1].expand(3, -1, -1)
    strided = torch.stack([scores, scores], -1)[..., 0]
    return [(transposed, scores), (expanded, scores[:1].repeat(3, 1, 1)), (strided, scores)]


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_non_contiguous_arc_scores_give_the_same_answers(cls, multiroot):
    scores = torch.randn(3, 5, 5)
    for view, dense in layouts(scores):
        assert not view.is_contiguous()
        crf, reference = cls(view, multiroot=multiroot), cls(dense, multiroot=multiroot)
        torch.testing.assert_close(crf.partition, reference.partition)
        torch.testing.assert_close(crf.marginals, reference.marginals)
        torch.testing.assert_close(crf.entropy(), reference.entropy())
        torch.testing.assert_close(crf.argmax, reference.argmax)
        assert crf.sample((2,)).shape == (2, 3, 5)
    leaf = scores.clone().requires_grad_(True)
    cls(leaf.transpose(-1, -2), multiroot=multiroot).marginals.sum().backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_empty_batch_gives_empty_results(cls, multiroot):
    crf = cls(torch.zeros(0, 4, 4), multiroot=multiroot)
    assert crf.batch_shape == (0,)
    assert crf.partition.shape == (0,) and crf.marginals.shape == (0, 4, 4)
    assert crf.attention.shape == (0, 4, 4) and crf.entropy().shape == (0,)
    assert crf.argmax.shape == (0, 4) and crf.sample((2,)).shape == (2, 0, 4)
    assert crf.log_prob(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)
    leaf = torch.zeros(2, 0, 3, 3, requires_grad=True)
    cls(leaf, multiroot=multiroot).partition.sum().backward()
    assert leaf.grad.shape == (2, 0, 3, 3)


@pytest.mark.parametrize("multiroot", [False, True])
def test_norm_estimate_agrees_with_the_explicit_inverse_on_the_conditioning(multiroot):
    generator = torch.Generator().manual_seed(14)
    mild = torch.randn(4, 40, 40, generator=generator, dtype=torch.float64)
    peaked = 100 * torch.randn(4, 40, 40, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([40, 40, 30, 2])
    for scores, expected in ((mild, True), (peaked, False)):
        matrix, _, _, _ = tree_module._kirchhoff(scores, lengths, multiroot)
        factors, pivots, info = torch.linalg.lu_factor_ex(matrix)
        inverse, _ = torch.linalg.inv_ex(matrix)
        estimated = tree_module._well_conditioned_lu(matrix, factors, pivots, info)
        explicit = tree_module._well_conditioned(matrix, inverse, info)
        assert torch.equal(estimated[:3], explicit[:3])
        assert bool((explicit[:3] == expected).all())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape", [(2, 3), (3, 4), ()])
def test_value_of_the_wrong_shape_raises_value_error(cls, shape):
    crf = cls(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="value"):
        crf.log_prob(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("multiroot", [False, True])
def test_second_derivatives_stay_finite_when_weights_differ_by_over_709_nats(multiroot):
    # torch.logaddexp's double backward is NaN there; training through the marginals of
    # peaked float32 scores hit it
    scores = 100 * torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2))
    gradients = []
    for dtype in (torch.float32, torch.float64):
        leaf = scores.to(dtype).detach().requires_grad_(True)
        marginals = NonProjectiveDependencyCRF(leaf, multiroot=multiroot).marginals
        (marginals * weights.to(dtype)).sum().backward()
        assert torch.isfinite(leaf.grad).all()
        gradients.append(leaf.grad.double())
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("multiroot", [False, True])
def test_gradcheck_of_marginals_at_scale_400(multiroot):
    scores = (
        400 * torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    ).requires_grad_(True)

    def marginals(x):
        return NonProjectiveDependencyCRF(x, multiroot=multiroot).marginals

    assert torch.autograd.gradcheck(marginals, (scores,))


@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 300.0),
    size=st.integers(1, 12),
    multiroot=st.booleans(),
    float64=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_training_through_marginals_gives_finite_gradients(seed, scale, size, multiroot, float64):
    dtype = torch.float64 if float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(2, size, size, generator=generator, dtype=dtype)
    lengths = torch.randint(1, size + 1, (2,), generator=generator)
    leaf = scores.clone().requires_grad_(True)
    crf = NonProjectiveDependencyCRF(leaf, lengths=lengths, multiroot=multiroot)
    marginals = crf.marginals
    torch.testing.assert_close(
        marginals.detach(),
        NonProjectiveDependencyCRF(scores, lengths=lengths, multiroot=multiroot).marginals,
        atol=1e-5 if dtype == torch.float32 else 1e-9,
        rtol=0,
    )
    loss = (marginals * torch.randn(2, size, size, generator=generator, dtype=dtype)).sum()
    (loss + crf.partition.sum()).backward()
    assert torch.isfinite(leaf.grad).all()
