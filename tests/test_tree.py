"""Dependency CRFs against brute-force enumeration of every (projective) tree."""

import itertools

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceGraph_ELBO
from pyro.optim import Adam

from structattn.distributions import tree as tree_module
from structattn.distributions.tree import NonProjectiveDependencyCRF, ProjectiveDependencyCRF

torch.set_num_threads(1)

CLASSES = [NonProjectiveDependencyCRF, ProjectiveDependencyCRF]
CASES = [(cls, multiroot) for cls in CLASSES for multiroot in (False, True)]


def is_tree(heads, multiroot):
    size = len(heads)
    roots = [d for d in range(size) if heads[d] == d]
    if not roots or (not multiroot and len(roots) != 1):
        return False
    for start in range(size):
        node, steps = start, 0
        while heads[node] != node:
            node, steps = heads[node], steps + 1
            if steps > size:
                return False
    return True


def is_projective(heads):
    # the root sits left of every word, at position -1
    arcs = [(-1 if h == d else h, d) for d, h in enumerate(heads)]
    spans = [(min(a, b), max(a, b)) for a, b in arcs]
    for (l1, r1), (l2, r2) in itertools.combinations(spans, 2):
        if l1 < l2 < r1 < r2 or l2 < l1 < r2 < r1:
            return False
    return True


def all_trees(size, multiroot, projective):
    trees = [
        heads
        for heads in itertools.product(range(size), repeat=size)
        if is_tree(heads, multiroot) and (not projective or is_projective(heads))
    ]
    return torch.tensor(trees)


def enumerate_trees(crf, index):
    """Every tree of batch element ``index`` (zero-padded) and its exact log probability."""
    length = int(crf.lengths[index])
    trees = all_trees(length, crf.multiroot, isinstance(crf, ProjectiveDependencyCRF))
    values = torch.zeros(len(trees), crf.num_words, dtype=torch.long)
    values[:, :length] = trees
    scores = crf.score(values.unsqueeze(1).expand(-1, crf.batch_shape[0], -1))[:, index]
    return values, scores - torch.logsumexp(scores, 0)


def make(cls, multiroot, size=4, batch=3, scale=1.0, dtype=torch.float64, seed=0, lengths=True):
    generator = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(batch, size, size, generator=generator, dtype=dtype)
    lens = torch.tensor([size, 2, 1, size - 1][:batch]) if lengths else None
    return cls(scores, lengths=lens, multiroot=multiroot)


def test_tree_counts_match_known_formulas():
    # Cayley: (n+1)^(n-1) rooted forests; n^(n-1) single-root trees; projective: 1, 2, 7, 30
    assert [len(all_trees(n, True, False)) for n in (1, 2, 3, 4)] == [1, 3, 16, 125]
    assert [len(all_trees(n, False, False)) for n in (1, 2, 3, 4)] == [1, 2, 9, 64]
    assert [len(all_trees(n, False, True)) for n in (1, 2, 3, 4)] == [1, 2, 7, 30]


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_partition_and_log_prob_match_brute_force(cls, multiroot):
    crf = make(cls, multiroot)
    for index in range(3):
        values, log_p = enumerate_trees(crf, index)
        scores = crf.score(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(crf.partition[index], torch.logsumexp(scores, 0))
        alone = cls(
            crf.arc_scores[index : index + 1],
            lengths=crf.lengths[index : index + 1],
            multiroot=multiroot,
        )
        log_probs = alone.log_prob(values.unsqueeze(1))[:, 0]
        torch.testing.assert_close(log_probs, log_p)
        torch.testing.assert_close(
            torch.logsumexp(log_probs, 0), torch.zeros((), dtype=torch.float64)
        )


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_marginals_match_brute_force_for_every_tree(cls, multiroot):
    crf = make(cls, multiroot)
    marginals = crf.marginals
    for index in range(3):
        values, log_p = enumerate_trees(crf, index)
        expected = (
            crf.to_parts(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
            * log_p.exp().view(-1, 1, 1)
        ).sum(0)
        torch.testing.assert_close(marginals[index], expected)


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_marginals_with_grad_match_the_closed_form(cls, multiroot):
    crf = make(cls, multiroot)
    leaf = crf.arc_scores.clone().requires_grad_(True)
    recorded = cls(leaf, lengths=crf.lengths, multiroot=multiroot).marginals
    assert recorded.requires_grad
    torch.testing.assert_close(recorded.detach(), crf.marginals)


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_argmax_is_the_best_tree(cls, multiroot):
    crf = make(cls, multiroot)
    best = crf.argmax
    for index in range(3):
        values, log_p = enumerate_trees(crf, index)
        torch.testing.assert_close(best[index], values[log_p.argmax()])


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_entropy_and_kl_match_brute_force(cls, multiroot):
    p, q = make(cls, multiroot, seed=1), make(cls, multiroot, seed=2)
    entropy, kl = p.entropy(), p.kl_divergence(q)
    for index in range(3):
        _, log_p = enumerate_trees(p, index)
        _, log_q = enumerate_trees(q, index)
        torch.testing.assert_close(entropy[index], -(log_p.exp() * log_p).sum())
        torch.testing.assert_close(kl[index], (log_p.exp() * (log_p - log_q)).sum())


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_sample_frequencies_match_probabilities(cls, multiroot):
    torch.manual_seed(0)
    crf = make(cls, multiroot, size=3, batch=2, lengths=False)
    draws = crf.sample((20000,))
    assert draws.shape == (20000, 2, 3)
    for index in range(2):
        values, log_p = enumerate_trees(crf, index)
        codes = (draws[:, index] * torch.tensor([9, 3, 1])).sum(-1)
        expected = (values * torch.tensor([9, 3, 1])).sum(-1)
        freq = torch.stack([(codes == c).double().mean() for c in expected])
        assert abs(float(freq.sum()) - 1.0) < 1e-9, "a sample is not a valid tree"
        assert (freq - log_p.exp()).abs().max() < 0.015


@pytest.mark.parametrize("cls", CLASSES)
def test_gradcheck_in_float64(cls):
    scores = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 3])
    for multiroot in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, m=multiroot: cls(x, lengths=lengths, multiroot=m).partition, (scores,)
        )
        assert torch.autograd.gradcheck(
            lambda x, m=multiroot: cls(x, lengths=lengths, multiroot=m).marginals, (scores,)
        )


@pytest.mark.parametrize("cls, multiroot", CASES)
def test_variable_lengths_match_each_sentence_alone(cls, multiroot):
    torch.manual_seed(1)
    scores = torch.randn(3, 6, 6)
    lengths = torch.tensor([6, 3, 1])
    batched = cls(scores, lengths=lengths, multiroot=multiroot)
    for index, length in enumerate(lengths.tolist()):
        alone = cls(scores[index : index + 1, :length, :length], multiroot=multiroot)
        torch.testing.assert_close(batched.partition[index], alone.partition[0])
        torch.testing.assert_close(
            batched.marginals[index, :length, :length], alone.marginals[0], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(batched.argmax[index, :length], alone.argmax[0])
        assert bool((batched.marginals[index, length:] == 0).all())
        assert bool((batched.marginals[index, :, length:] == 0).all())


@pytest.mark.parametrize("multiroot", [False, True])
def test_non_projective_float32_scale_100_stays_finite(multiroot):
    torch.manual_seed(2)
    scores = 100 * torch.randn(4, 32, 32)
    crf32 = NonProjectiveDependencyCRF(scores, multiroot=multiroot)
    crf64 = NonProjectiveDependencyCRF(scores.double(), multiroot=multiroot)
    marginals = crf32.marginals
    assert torch.isfinite(marginals).all() and torch.isfinite(crf32.partition).all()
    torch.testing.assert_close(crf32.partition.double(), crf64.partition, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(marginals.double(), crf64.marginals, atol=1e-3, rtol=0)


def spy_float32_inverse(monkeypatch):
    """Record, per call, whether the float32 inverse of the matrix-tree marginals was kept."""
    kept = []
    original = tree_module._float32_inverse_t

    def spy(matrix, multiroot):
        inverse_t = original(matrix, multiroot)
        kept.append(inverse_t is not None)
        return inverse_t

    monkeypatch.setattr(tree_module, "_float32_inverse_t", spy)
    return kept


def paired_cycles(size, bonus):
    """Scores whose best heads pair words into 2-cycles, every other arc ``bonus`` lower."""
    scores = torch.zeros(2, size, size)
    first = torch.arange(0, size - 1, 2)
    scores[:, first, first + 1] = bonus
    scores[:, first + 1, first] = bonus
    return scores


@pytest.mark.parametrize("multiroot", [False, True])
def test_blocked_inverses_match_lapack(multiroot):
    torch.manual_seed(5)
    size = 100
    weights = torch.rand(3, size, size, dtype=torch.float64)
    matrix = torch.diag_embed(weights.sum(-2) + 0.1) - weights
    if multiroot:
        blocked = tree_module._dominant_inverse(matrix)
    else:
        matrix[:, 0] = torch.rand(3, size, dtype=torch.float64)  # a root row, not dominant
        blocked = tree_module._bordered_inverse(matrix)
    torch.testing.assert_close(blocked, torch.linalg.inv(matrix))


@pytest.mark.parametrize("multiroot", [False, True])
def test_non_projective_long_float32_marginals_run_in_float32_and_match_float64(
    monkeypatch, multiroot
):
    kept = spy_float32_inverse(monkeypatch)
    torch.manual_seed(6)
    size = tree_module._BLOCKED_INVERSE_WORDS + 8
    scores = torch.randn(3, size, size)
    lengths = torch.tensor([size, size - 5, 1])
    marginals = NonProjectiveDependencyCRF(scores, lengths=lengths, multiroot=multiroot).marginals
    assert kept == [True]
    expected = NonProjectiveDependencyCRF(
        scores.double(), lengths=lengths, multiroot=multiroot
    ).marginals
    assert marginals.dtype == torch.float32
    torch.testing.assert_close(marginals.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("multiroot", [False, True])
@pytest.mark.parametrize(
    "scores",
    [
        100 * torch.randn(2, 80, 80, generator=torch.Generator().manual_seed(7)),
        paired_cycles(80, 12.0),
        paired_cycles(80, 20.0),  # exp(-20) all but vanishes next to 1 in a float32 sum
    ],
)
def test_non_projective_ill_conditioned_float32_marginals_fall_back_to_float64(
    monkeypatch, multiroot, scores
):
    kept = spy_float32_inverse(monkeypatch)
    marginals = NonProjectiveDependencyCRF(scores, multiroot=multiroot).marginals
    assert True not in kept  # refused by the condition estimate, or not tried at all
    expected = NonProjectiveDependencyCRF(scores.double(), multiroot=multiroot).marginals
    assert torch.isfinite(marginals).all()
    torch.testing.assert_close(marginals.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("multiroot", [False, True])
def test_non_projective_float32_is_not_tried_for_widely_spread_scores(monkeypatch, multiroot):
    kept = spy_float32_inverse(monkeypatch)
    scores = 100 * torch.randn(2, 80, 80, generator=torch.Generator().manual_seed(8))
    marginals = NonProjectiveDependencyCRF(scores, multiroot=multiroot).marginals
    assert kept == [] and torch.isfinite(marginals).all()


@pytest.mark.parametrize("multiroot", [False, True])
def test_float32_inverse_of_a_singular_matrix_is_refused(multiroot):
    assert tree_module._float32_inverse_t(torch.zeros(2, 80, 80), multiroot) is None


def test_projective_float32_scale_100_stays_finite():
    torch.manual_seed(3)
    scores = 100 * torch.randn(2, 16, 16)
    crf = ProjectiveDependencyCRF(scores)
    marginals = crf.marginals
    assert torch.isfinite(marginals).all()
    torch.testing.assert_close(marginals.sum(-2), torch.ones(2, 16), atol=1e-4, rtol=0)


def test_multiroot_flag_is_per_instance():
    scores = torch.randn(1, 4, 4)
    first = NonProjectiveDependencyCRF(scores, multiroot=True)
    before = first.partition.clone()
    single = NonProjectiveDependencyCRF(scores, multiroot=False).partition
    projective = ProjectiveDependencyCRF(scores, multiroot=False).partition
    assert bool(single < before) and bool(projective < before)
    torch.testing.assert_close(first.partition, before)


@pytest.mark.parametrize("cls", CLASSES)
def test_marginals_build_no_graph_and_leave_the_input_alone(cls):
    scores = torch.randn(2, 5, 5)
    with torch.no_grad():
        assert not cls(scores).marginals.requires_grad
    with torch.inference_mode():
        assert torch.isfinite(cls(scores).marginals).all()
        assert cls(scores).argmax.shape == (2, 5)
    assert not scores.requires_grad


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arc_scores=torch.randn(2, 3, 4)), "arc_scores"),
        (dict(arc_scores=torch.randn(3)), "arc_scores"),
        (dict(arc_scores=torch.randn(2, 3, 3), lengths=torch.tensor([0, 3])), "lengths"),
        (dict(arc_scores=torch.randn(2, 3, 3), lengths=torch.tensor([4, 3])), "lengths"),
        (dict(arc_scores=torch.full((2, 3, 3), float("nan"))), "arc_scores"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_score_function_site_under_tracegraph_elbo(cls):
    pyro.clear_param_store()
    torch.manual_seed(4)
    prior = torch.randn(2, 4, 4)

    def model():
        with pyro.plate("batch", 2):
            pyro.sample("tree", cls(prior))

    def guide():
        scores = pyro.param("scores", torch.zeros(2, 4, 4))
        with pyro.plate("batch", 2):
            pyro.sample("tree", cls(scores))

    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceGraph_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(pyro.param("scores").detach(), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("cls", CLASSES)
def test_expand_broadcasts_batch_dims(cls):
    crf = make(cls, False, batch=1, lengths=False)
    expanded = crf.expand(torch.Size([3, 1]))
    assert expanded.batch_shape == (3, 1) and expanded.multiroot is False
    torch.testing.assert_close(expanded.partition, crf.partition.expand(3, 1))
    assert expanded.sample((2,)).shape == (2, 3, 1, 4)


@pytest.mark.parametrize("cls", [NonProjectiveDependencyCRF, ProjectiveDependencyCRF])
@pytest.mark.parametrize("multiroot", [False, True])
def test_max_and_cross_entropy_match_brute_force(cls, multiroot):
    crf, other = make(cls, multiroot, seed=0), make(cls, multiroot, seed=1)
    for index in range(3):
        values, log_p = enumerate_trees(crf, index)
        _, log_q = enumerate_trees(other, index)
        scores = crf.score(values.unsqueeze(1).expand(-1, 3, -1))[:, index]
        torch.testing.assert_close(crf.max[index], scores.max())
        torch.testing.assert_close(crf.cross_entropy(other)[index], -(log_p.exp() * log_q).sum())
