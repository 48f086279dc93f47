"""InferenceNetwork: q(z | x, y) from a bi-GRU over the target and bilinear source scores."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structattn.distributions import CategoricalAlignment, SparsemaxAlignment
from structattn.infer import AlignmentTerms, ExactEstimator
from structattn.nn.inference import InferenceNetwork

torch.set_num_threads(1)

B, T, S, D, V = 3, 5, 4, 6, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, T, D, generator=g)
    source = torch.randn(B, S, D, generator=g)
    source_mask = torch.arange(S) < torch.tensor([S, 3, 2])[:, None]
    target_mask = torch.arange(T) < torch.tensor([T, 4, 2])[:, None]
    return target, source, source_mask, target_mask


def test_returns_an_alignment_over_source_keys_per_target_query():
    target, source, source_mask, target_mask = _inputs()
    q = InferenceNetwork(D, D, hidden=8)(target, source, source_mask, target_mask)
    assert isinstance(q, CategoricalAlignment)
    assert q.batch_shape == (B, T) and q.attention.shape == (B, T, S)
    assert torch.allclose(q.attention.sum(-1), torch.ones(B, T))
    assert (q.attention.masked_select(~source_mask[:, None, :].expand(B, T, S)) == 0).all()


def test_each_query_sees_the_whole_target_in_both_directions():
    target, source, _, _ = _inputs()
    net = InferenceNetwork(D, D, hidden=8)
    base = net(target, source).attention
    changed_first, changed_last = target.clone(), target.clone()
    changed_first[:, 0] += 1.0
    changed_last[:, -1] += 1.0
    middle = T // 2
    assert not torch.allclose(net(changed_last, source).attention[:, middle], base[:, middle])
    assert not torch.allclose(net(changed_first, source).attention[:, middle], base[:, middle])


def test_padding_of_the_target_does_not_change_real_queries():
    target, source, source_mask, target_mask = _inputs()
    net = InferenceNetwork(D, D, hidden=8)
    base = net(target, source, source_mask, target_mask).attention
    noisy = target.clone()
    noisy[~target_mask] = 100.0
    again = net(noisy, source, source_mask, target_mask).attention
    assert torch.allclose(base[target_mask], again[target_mask], atol=1e-6)


def test_token_ids_sparse_normalizer_and_raw_source_vectors():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(V, (B, T), generator=g)
    source = torch.randint(V, (B, S), generator=g)
    q = InferenceNetwork(D, D, hidden=8, target_vocab=V, source_vocab=V, normalizer="sparsemax")(
        target, source
    )
    assert isinstance(q, SparsemaxAlignment) and q.batch_shape == (B, T)
    raw = InferenceNetwork(D, D, hidden=8, encode_source=False)
    assert raw(*_inputs()[:2]).batch_shape == (B, T)


def test_trains_as_a_guide_under_the_exact_elbo():
    target, source, source_mask, target_mask = _inputs()
    torch.manual_seed(0)
    net = InferenceNetwork(D, D, hidden=8)
    prior = CategoricalAlignment(logits=torch.zeros(B, T, S), mask=source_mask[:, None, :])
    table = torch.randn(B, T, S, generator=torch.Generator().manual_seed(2)) * 3
    terms = AlignmentTerms(prior, table, target_mask)
    optim = torch.optim.Adam(net.parameters(), lr=0.05)
    estimator = ExactEstimator()
    losses = []
    for _ in range(60):
        optim.zero_grad()
        loss = estimator.loss(terms, net(target, source, source_mask, target_mask))
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_dim=0, source_dim=D), "target_dim"),
        (dict(target_dim=D, source_dim=D, hidden=7), "hidden"),
        (dict(target_dim=D, source_dim=D, normalizer="magic"), "normalizer"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceNetwork(**kwargs)


def test_bad_inputs_raise_value_error():
    target, source, _, _ = _inputs()
    net = InferenceNetwork(D, D, hidden=8)
    with pytest.raises(ValueError, match="target"):
        net(target[0], source)
    with pytest.raises(ValueError, match="batch"):
        net(target, source[:2])
    with pytest.raises(ValueError, match="target"):
        InferenceNetwork(D, D, hidden=8, target_vocab=V)(target, source)


# ---------------------------------------------------------------- the evidence feature


def _evidence(seed=3, dtype=torch.float32):
    return torch.randn(B, T, S, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 4


def test_evidence_enters_the_scores_with_its_learned_weight():
    target, source, source_mask, target_mask = _inputs()
    net = InferenceNetwork(D, D, hidden=8, evidence=True, evidence_init=0.7)
    evidence = _evidence()
    with torch.no_grad():
        learned = net.scores(*net.encode(target, source, source_mask, target_mask))
    expected = (learned + 0.7 * evidence).masked_fill(~source_mask[:, None, :], -torch.inf)
    found = net(target, source, source_mask, target_mask, evidence).attention
    assert torch.allclose(found, expected.softmax(-1), atol=1e-6)


def test_evidence_is_an_input_without_gradient_while_its_weight_learns():
    target, source, source_mask, target_mask = _inputs()
    net = InferenceNetwork(D, D, hidden=8, evidence=True)
    evidence = _evidence().requires_grad_()
    q = net(target, source, source_mask, target_mask, evidence)
    (q.attention * _evidence(seed=4)).sum().backward()
    assert evidence.grad is None
    assert net.evidence_weight.grad is not None and net.evidence_weight.grad.abs() > 0
    assert net.bilinear.weight.grad.abs().sum() > 0


def test_guide_with_evidence_has_exact_gradients_in_float64():
    target, source, source_mask, target_mask = _inputs()
    net = InferenceNetwork(D, D, hidden=8, evidence=True).double()
    target, source = target.double(), source.double()
    evidence = _evidence(dtype=torch.float64)
    weights = _evidence(seed=5, dtype=torch.float64)

    def elbo_like(weight, bilinear):
        params = {"evidence_weight": weight, "bilinear.weight": bilinear}
        q = torch.func.functional_call(net, params, (target, source, source_mask, target_mask,
                                                     evidence))
        return (q.attention * weights).sum(-1)

    inputs = (net.evidence_weight.detach().clone().requires_grad_(),
              net.bilinear.weight.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(elbo_like, inputs)


def test_an_impossible_emission_at_every_key_still_gives_a_distribution():
    target, source, source_mask, target_mask = _inputs()
    net = InferenceNetwork(D, D, hidden=8, evidence=True)
    evidence = _evidence()
    evidence[0, 1] = -torch.inf
    evidence[1, 0, 0] = -torch.inf
    attention = net(target, source, source_mask, target_mask, evidence).attention
    assert torch.isfinite(attention).all()
    assert torch.allclose(attention.sum(-1), torch.ones(B, T))
    assert attention[1, 0, 0] == 0 and attention[1, 0, 1:3].sum() > 0.99


def test_evidence_is_required_exactly_when_the_network_reads_it():
    target, source, source_mask, target_mask = _inputs()
    with pytest.raises(ValueError, match="evidence"):
        InferenceNetwork(D, D, hidden=8)(target, source, source_mask, target_mask, _evidence())
    reader = InferenceNetwork(D, D, hidden=8, evidence=True)
    with pytest.raises(ValueError, match="evidence"):
        reader(target, source, source_mask, target_mask)
    with pytest.raises(ValueError, match="evidence"):
        reader(target, source, source_mask, target_mask, _evidence()[:, :2])
    with pytest.raises(ValueError, match="evidence"):
        InferenceNetwork(D, D, hidden=8, evidence=1)
    with pytest.raises(ValueError, match="evidence_init"):
        InferenceNetwork(D, D, hidden=8, evidence=True, evidence_init="one")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 30.0, 100.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_constant_per_query_in_the_evidence_changes_nothing(seed, scale, dtype):
    # the evidence matters only through differences between keys: log p(y_t | k) and the
    # posterior's log p(y_t | k) - log p(y_t) give the same guide
    target, source, source_mask, target_mask = _inputs(seed)
    net = InferenceNetwork(D, D, hidden=8, evidence=True).to(dtype)
    target, source = target.to(dtype), source.to(dtype)
    evidence = _evidence(seed, dtype) * scale / 4
    shift = torch.randn(B, T, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    base = net(target, source, source_mask, target_mask, evidence).attention
    moved = net(target, source, source_mask, target_mask, evidence + scale * shift).attention
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(base, moved, atol=tolerance)
    assert torch.isfinite(base).all()


def test_a_guide_saved_without_evidence_loads_into_one_with_evidence_and_gives_the_same_q():
    """Checkpoints of variational-enum written before the evidence existed must still load,
    and give the guide they were trained with (evidence weight 0)."""
    torch.manual_seed(0)
    plain = InferenceNetwork(8, 6, hidden=8, target_vocab=11, encode_source=False)
    with_evidence = InferenceNetwork(8, 6, hidden=8, target_vocab=11, encode_source=False,
                                     evidence=True)
    with_evidence.load_state_dict(plain.state_dict())
    assert float(with_evidence.evidence_weight.detach()) == 0.0
    target = torch.randint(1, 11, (2, 4))
    source = torch.randn(2, 5, 6)
    evidence = torch.randn(2, 4, 5)
    torch.testing.assert_close(with_evidence(target, source, evidence=evidence).probs,
                               plain(target, source).probs)
