"""sa.nn.MultiheadAttention: torch's drop-in, normalizer heads, learned alphas, Pyro enumeration."""

import itertools

import pyro
import pyro.distributions as pdist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import TraceEnum_ELBO, config_enumerate

from structattn.nn.multihead import (
    HEAD_READOUTS,
    HeadwiseEntmaxNormalizer,
    MultiheadAttention,
)

EMBED, HEADS, QUERIES, KEYS, BATCH = 8, 2, 4, 5, 3
NORMALIZERS = ["softmax", "sparsemax", "entmax15", "entmax-heads"]


def _pair(**kwargs):
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs).double()
    ours = MultiheadAttention(EMBED, HEADS, **kwargs).double()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _padding(kind):
    blocked = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    blocked[0, -2:] = True
    blocked[1, 0] = True
    if kind == "bool":
        return blocked
    noise = 0.1 * torch.randn(BATCH, KEYS, dtype=torch.double)
    return noise.masked_fill(blocked, -torch.inf)


def _attn_mask(kind):
    blocked = torch.ones(QUERIES, KEYS, dtype=torch.bool).triu(2)
    if kind == "bool":
        return blocked
    if kind == "float":
        return torch.randn(QUERIES, KEYS, dtype=torch.double).masked_fill(blocked, -torch.inf)
    return torch.randn(BATCH * HEADS, QUERIES, KEYS, dtype=torch.double)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("layout", [
    dict(batch_first=True), dict(batch_first=False), dict(kdim=6, vdim=7),
    dict(add_bias_kv=True), dict(add_zero_attn=True, bias=False)])
def test_torch_state_dict_gives_torch_outputs_under_every_mask(layout):
    torch.manual_seed(0)
    reference, ours = _pair(**layout)
    batch_first = layout.get("batch_first", False)
    query = torch.randn(BATCH, QUERIES, EMBED, dtype=torch.double)
    key = torch.randn(BATCH, KEYS, layout.get("kdim", EMBED), dtype=torch.double)
    value = torch.randn(BATCH, KEYS, layout.get("vdim", EMBED), dtype=torch.double)
    if not batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    for padding, mask, need, average in itertools.product(
            [None, "bool", "float"], [None, "bool", "float", "per-head"], [True, False],
            [True, False]):
        kwargs = dict(key_padding_mask=None if padding is None else _padding(padding),
                      attn_mask=None if mask is None else _attn_mask(mask),
                      need_weights=need, average_attn_weights=average)
        expected, expected_weights = reference(query, key, value, **kwargs)
        found, weights = ours(query, key, value, **kwargs)
        assert torch.allclose(found, expected, atol=1e-12), (padding, mask, need, average)
        if need:
            assert torch.allclose(weights, expected_weights, atol=1e-12)
        else:
            assert weights is None


@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_causal_and_unbatched_match_torch(need_weights):
    torch.manual_seed(1)
    reference, ours = _pair(batch_first=True)
    x = torch.randn(BATCH, KEYS, EMBED, dtype=torch.double)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(KEYS, dtype=torch.double)
    expected, _ = reference(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    with_mask, _ = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    built, _ = ours(x, x, x, is_causal=True, need_weights=need_weights)
    assert torch.allclose(with_mask, expected, atol=1e-12)
    assert torch.allclose(built, expected, atol=1e-12)
    expected, expected_weights = reference(x[0], x[0], x[0])
    found, weights = ours(x[0], x[0], x[0])
    assert torch.allclose(found, expected, atol=1e-12)
    assert torch.allclose(weights, expected_weights, atol=1e-12)


def test_soft_heads_without_weights_run_through_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(BATCH, KEYS, EMBED)
    layer(x, x, x, need_weights=False)
    assert calls == [1]
    layer(x, x, x, need_weights=True)
    MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer="sparsemax")(
        x, x, x, need_weights=False)
    assert calls == [1]


@pytest.mark.parametrize("normalizer", NORMALIZERS + [["softmax", "sparsemax"]])
def test_masked_keys_get_exactly_zero_weight(normalizer):
    torch.manual_seed(2)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer=normalizer)
    x = 3 * torch.randn(BATCH, KEYS, EMBED)
    padding = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    padding[0, -2:] = True
    _, weights = layer(x, x, x, key_padding_mask=padding, is_causal=True,
                       average_attn_weights=False)
    assert torch.all(weights[0, ..., -2:] == 0)
    future = torch.ones(KEYS, KEYS, dtype=torch.bool).triu(1)
    assert torch.all(weights[:, :, future] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(BATCH, HEADS, KEYS))


@settings(max_examples=25, deadline=None)
@given(normalizer=st.sampled_from(NORMALIZERS), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.1, 1.0, 30.0]), need_weights=st.booleans())
def test_any_padding_and_causal_mask_zero_exactly_the_masked_keys(normalizer, seed, scale,
                                                                  need_weights):
    generator = torch.Generator().manual_seed(seed)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer=normalizer)
    x = scale * torch.randn(BATCH, KEYS, EMBED, generator=generator)
    padding = torch.rand(BATCH, KEYS, generator=generator) < 0.5
    padding[:, 0] = False                                  # the causal mask needs key 0
    output, weights = layer(x, x, x, key_padding_mask=padding, is_causal=True,
                            average_attn_weights=False)
    allowed = ~padding[:, None, None, :] & torch.ones(KEYS, KEYS, dtype=torch.bool).tril()
    assert torch.all(weights[~allowed.expand_as(weights)] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(BATCH, HEADS, KEYS), atol=1e-5)
    expected = layer.out_proj(torch.einsum("bhqk,bhkd->bqhd", weights, layer.in_proj_weight[
        2 * EMBED:].matmul(x.unsqueeze(-1)).squeeze(-1).add(layer.in_proj_bias[2 * EMBED:])
        .view(BATCH, KEYS, HEADS, -1).transpose(1, 2)).reshape(BATCH, KEYS, EMBED))
    found, _ = layer(x, x, x, key_padding_mask=padding, is_causal=True,
                     need_weights=need_weights)
    assert torch.allclose(found, expected, atol=1e-4)
    assert torch.allclose(output, expected, atol=1e-4)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_a_query_without_valid_keys_is_a_value_error(normalizer):
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer=normalizer)
    x = torch.randn(BATCH, KEYS, EMBED)
    padding = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    padding[1] = True
    for need_weights in (True, False):
        with pytest.raises(ValueError, match="no valid key"):
            layer(x, x, x, key_padding_mask=padding, need_weights=need_weights)


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="normalizer"):
        MultiheadAttention(EMBED, HEADS, normalizer="nope")
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadAttention(EMBED, HEADS, normalizer=["softmax"] * 3)
    with pytest.raises(ValueError, match="readout"):
        MultiheadAttention(EMBED, HEADS, readout="nope")
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(BATCH, KEYS, EMBED)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, x, x, key_padding_mask=torch.zeros(BATCH, KEYS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, x, x, attn_mask=torch.zeros(KEYS, KEYS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        layer(x[..., :-1], x, x)
    with pytest.raises(ValueError, match="query must be a floating-point tensor"):
        layer(x.long(), x, x)
    with pytest.raises(ValueError, match="value must be a floating-point tensor"):
        layer(x, x, x.tolist())
    with pytest.raises(ValueError, match="alpha"):
        HeadwiseEntmaxNormalizer(HEADS, alpha=2.5)
    mixed = MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer=["softmax"] * HEADS)
    with pytest.raises(ValueError, match="return_alignment"):
        mixed(x, x, x, return_alignment=True)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradcheck_in_float64(normalizer):
    torch.manual_seed(3)
    layer = MultiheadAttention(4, 2, batch_first=True, normalizer=normalizer).double()
    x = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    padding = torch.tensor([[False, False, True], [False, False, False]])

    def output(inputs, *parameters):
        return layer(inputs, inputs, inputs, key_padding_mask=padding, need_weights=False)[0]

    assert torch.autograd.gradcheck(output, (x,), atol=1e-6)
    if normalizer == "entmax-heads":
        raw = layer.normalizer.raw_alpha

        def through_alpha(raw_alpha):
            inputs = x.detach()
            return torch.func.functional_call(
                layer, {"normalizer.raw_alpha": raw_alpha}, (inputs, inputs, inputs),
                {"key_padding_mask": padding, "need_weights": False})[0]

        assert torch.autograd.gradcheck(through_alpha, (raw.detach().clone().requires_grad_(),),
                                        atol=1e-6)


def test_learned_alpha_grows_when_sparse_heads_help():
    """Each query must copy one of 8 orthogonal keys; its score beats the others' by 1, so a
    dense head mixes in the seven distractors and sparsemax (alpha = 2) picks the key alone:
    training alpha alone on this loss must push every head's alpha up."""
    heads, head_dim, keys = 2, 8, 8
    embed = heads * head_dim
    layer = MultiheadAttention(embed, heads, batch_first=True, bias=False,
                               normalizer="entmax-heads", normalizer_kwargs={"alpha": 1.2})
    with torch.no_grad():
        layer.in_proj_weight.copy_(torch.eye(embed).repeat(3, 1))
        layer.out_proj.weight.copy_(torch.eye(embed))
    # key j is e_j in every head's subspace, scaled so that <q, k> / sqrt(head_dim) = 1
    key = torch.eye(keys).repeat(1, heads)[None] * head_dim ** 0.25
    query = key.transpose(0, 1)                                   # (keys, 1, embed)
    key = key.expand(keys, -1, -1)
    before = layer.alphas().clone()
    optimizer = torch.optim.Adam([layer.normalizer.raw_alpha], lr=0.1)
    for _ in range(30):
        output, _ = layer(query, key, key, need_weights=False)
        loss = (output - query).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = layer.alphas()
    assert torch.all(after > before + 0.3), (before, after)


@pytest.mark.parametrize("readout", sorted(set(HEAD_READOUTS) - {"soft"}))
def test_hard_readouts_give_one_hot_weights(readout):
    torch.manual_seed(5)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, readout=readout)
    x = torch.randn(BATCH, KEYS, EMBED)
    _, weights = layer(x, x, x, average_attn_weights=False)
    assert torch.all((weights == 0) | (weights == 1))
    assert torch.all(weights.sum(-1) == 1)


def test_straight_through_heads_pass_the_soft_gradient():
    torch.manual_seed(6)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, readout="straight-through")
    x = torch.randn(BATCH, KEYS, EMBED)
    output, _ = layer(x, x, x)
    output.sum().backward()
    assert layer.in_proj_weight.grad[:EMBED].abs().sum() > 0  # queries learn through it


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_enumeration_under_pyro_matches_the_hand_written_marginal(normalizer):
    """``return_alignment=True``: the heads' alignments as one Pyro site, summed out exactly
    by TraceEnum_ELBO; the loss equals -sum log sum_z p(z) N(y | v_z, 1)."""
    torch.manual_seed(7)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, normalizer=normalizer).double()
    query = torch.randn(BATCH, QUERIES, EMBED, dtype=torch.double)
    keys = torch.randn(BATCH, KEYS, EMBED, dtype=torch.double)
    padding = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    padding[0, -1] = True
    observed = torch.randn(BATCH, HEADS, QUERIES, dtype=torch.double)
    _, _, alignment = layer(query, keys, keys, key_padding_mask=padding,
                            return_alignment=True)
    assert alignment.batch_shape == (BATCH, HEADS, QUERIES)
    values = keys.sum(-1)                                         # (batch, keys)

    @config_enumerate
    def model():
        with pyro.plate("queries", QUERIES, dim=-1), pyro.plate("heads", HEADS, dim=-2), \
                pyro.plate("batch", BATCH, dim=-3):
            z = pyro.sample("z", alignment)
            # one-hot product: broadcasts over the enumeration dims Pyro puts on the left
            picked = torch.nn.functional.one_hot(z, KEYS).to(values) * values[:, None, None, :]
            pyro.sample("y", pdist.Normal(picked.sum(-1), 1.0), obs=observed)

    loss = TraceEnum_ELBO(max_plate_nesting=3).differentiable_loss(model, lambda: None)
    emission = pdist.Normal(values[:, None, None, :], 1.0).log_prob(observed[..., None])
    log_prior = alignment.attention.clamp_min(1e-300).log()
    expected = -(log_prior + emission).masked_fill(alignment.attention == 0, -torch.inf) \
        .logsumexp(-1).sum()
    assert torch.allclose(loss, expected, atol=1e-8)


@pytest.mark.parametrize("need_weights", [True, False])
def test_float32_outputs_match_torch_to_float_tolerance(need_weights):
    torch.manual_seed(8)
    reference = torch.nn.MultiheadAttention(64, 8, batch_first=True)
    ours = MultiheadAttention(64, 8, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(4, 33, 64)
    padding = torch.zeros(4, 33, dtype=torch.bool)
    padding[1, 20:] = True
    expected, _ = reference(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    found, _ = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    assert torch.allclose(found, expected, atol=1e-5)


def test_sampled_heads_train_the_scores_by_the_score_function_only():
    torch.manual_seed(9)
    layer = MultiheadAttention(EMBED, HEADS, batch_first=True, readout="sample")
    x = torch.randn(BATCH, KEYS, EMBED)
    output, weights, alignment = layer(x, x, x, average_attn_weights=False,
                                       return_alignment=True)
    output.sum().backward(retain_graph=True)
    assert torch.all(layer.in_proj_weight.grad[:2 * EMBED] == 0)  # no path through a sample
    layer.zero_grad()
    reward = -output.pow(2).sum(-1).detach()                       # (batch, queries)
    surrogate = -(reward[:, None, :] * alignment.log_prob(weights.argmax(-1))).sum()
    surrogate.backward()
    assert layer.in_proj_weight.grad[:2 * EMBED].abs().sum() > 0
