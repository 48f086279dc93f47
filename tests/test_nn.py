"""Scorers and LatentAttention."""

import math

import pytest
import torch

import structattn as sa
from structattn.nn import AdditiveScorer, BilinearScorer, DotScorer, MultiHeadScorer

torch.set_num_threads(1)


def test_dot_scorer_is_scaled_dot_product():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    expected = torch.einsum("bqd,bkd->bqk", q, k) / math.sqrt(8)
    assert torch.allclose(DotScorer()(q, k), expected, atol=1e-6)


def test_bilinear_and_additive_scorers_match_their_formulas():
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    bilinear = BilinearScorer(4, 6)
    expected = torch.einsum("bqd,de,bke->bqk", q, bilinear.proj.weight.T, k)
    assert torch.allclose(bilinear(q, k), expected, atol=1e-5)
    additive = AdditiveScorer(4, 6, hidden=7)
    manual = torch.zeros(2, 3, 5)
    for i in range(3):
        for j in range(5):
            hidden = torch.tanh(additive.query_proj(q[:, i]) + additive.key_proj(k[:, j]))
            manual[:, i, j] = additive.out(hidden).squeeze(-1)
    assert torch.allclose(additive(q, k), manual, atol=1e-5)


def test_multihead_scores_have_a_head_axis():
    scores = MultiHeadScorer(4, 6, heads=3, head_dim=2)(torch.randn(2, 5, 4), torch.randn(2, 7, 6))
    assert scores.shape == (2, 3, 5, 7)


def test_scorers_broadcast_over_enumeration_dims():
    scorer = BilinearScorer(4, 4)
    q = torch.randn(6, 1, 2, 3, 4)  # extra leading dims, as under enumeration
    k = torch.randn(2, 5, 4)
    assert scorer(q, k).shape == (6, 1, 2, 3, 5)


@pytest.mark.parametrize(
    "normalizer, cls",
    [
        ("softmax", sa.CategoricalAlignment),
        ("sparsemax", sa.SparsemaxAlignment),
        ("entmax15", sa.SparsemaxAlignment),
        ("relaxed", sa.RelaxedAlignment),
    ],
)
def test_latent_attention_returns_a_masked_alignment(normalizer, cls):
    attention = sa.nn.LatentAttention(4, 6, normalizer=normalizer)
    key_mask = torch.arange(5) < torch.tensor([5, 2])[:, None]
    dist = attention(torch.randn(2, 3, 4), torch.randn(2, 5, 6), key_mask)
    assert isinstance(dist, cls)
    assert dist.batch_shape == (2, 3)
    assert (dist.attention[1, :, 2:] == 0).all()
    assert torch.allclose(dist.attention.sum(-1), torch.ones(2, 3))


def test_latent_attention_multihead_mask_broadcasts_over_heads():
    attention = sa.nn.LatentAttention(4, 6, score="multihead",
                                      scorer_kwargs={"heads": 2, "head_dim": 3})
    key_mask = torch.arange(5) < torch.tensor([5, 2])[:, None]
    dist = attention(torch.randn(2, 3, 4), torch.randn(2, 5, 6), key_mask)
    assert dist.batch_shape == (2, 2, 3)
    assert (dist.attention[1, :, :, 2:] == 0).all()


def test_latent_attention_rejects_bad_settings():
    with pytest.raises(ValueError, match="normalizer"):
        sa.nn.LatentAttention(4, 4, normalizer="magic")
    with pytest.raises(ValueError, match="score"):
        sa.nn.LatentAttention(4, 4, score="magic")
    with pytest.raises(ValueError, match="softmax"):
        sa.nn.LatentAttention(4, 4, normalizer="softmax", heads=2)
    with pytest.raises(ValueError, match="temperature"):
        sa.nn.LatentAttention(4, 4, normalizer="relaxed", temperature=0.0)
    attention = sa.nn.LatentAttention(4, 4)
    with pytest.raises(ValueError, match="key_mask"):
        attention(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))


def test_readout_modes():
    dist = sa.CategoricalAlignment(logits=torch.randn(2, 3, 5))
    values = torch.randn(2, 5, 4)
    soft = sa.infer.readout(dist, values, "soft")
    assert torch.allclose(soft, dist.attention @ values)
    argmax = sa.infer.readout(dist, values, "argmax")
    assert torch.equal(argmax, sa.infer.gather(values, dist.attention.argmax(-1)))
    assert sa.infer.readout(dist, values, "sample").shape == (2, 3, 4)
    assert sa.infer.readout(dist, values, "enum").shape == (5, 2, 1, 4)
    with pytest.raises(ValueError, match="mode"):
        sa.infer.readout(dist, values, "telepathy")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_birnn_matches_a_packed_bidirectional_rnn(cell):
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from structattn.nn.rnn import BiRNN, reverse_padded

    torch.manual_seed(0)
    ours = BiRNN(5, 8, cell=cell).double()
    reference = (nn.LSTM if cell == "lstm" else nn.GRU)(
        5, 4, batch_first=True, bidirectional=True
    ).double()
    with torch.no_grad():
        for name, param in ours.forward_rnn.named_parameters():
            getattr(reference, name).copy_(param)
            getattr(reference, name + "_reverse").copy_(getattr(ours.backward_rnn, name))
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(6) < lengths[:, None]
    inputs = torch.randn(3, 6, 5, dtype=torch.float64)
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(reference(packed)[0], batch_first=True, total_length=6)
    found = ours(inputs, mask)
    assert torch.allclose(found[mask], expected[mask])
    assert torch.equal(reverse_padded(reverse_padded(inputs, mask), mask), inputs)


def test_birnn_rejects_odd_hidden_and_unknown_cell():
    from structattn.nn.rnn import BiRNN

    with pytest.raises(ValueError, match="even"):
        BiRNN(4, 5)
    with pytest.raises(ValueError, match="cell"):
        BiRNN(4, 6, cell="transformer")


@pytest.mark.parametrize("chunk_elements", [7, 1 << 20])
def test_emission_table_matches_dense_log_probs_at_every_real_pair(chunk_elements):
    torch.manual_seed(0)
    head = sa.nn.EmissionHead(5, 4, 6, vocab_size=7).double()
    states = torch.randn(2, 3, 5, dtype=torch.float64)
    values = torch.randn(2, 4, 4, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3))
    target_mask = torch.tensor([[True, True, True], [True, True, False]])
    key_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    table = head.table(states, values, targets, target_mask, key_mask,
                       chunk_elements=chunk_elements)
    dense = head.log_prob(states.unsqueeze(2), values.unsqueeze(1), targets.unsqueeze(-1))
    valid = target_mask[:, :, None] & key_mask[:, None, :]
    assert torch.allclose(table[valid], dense[valid])
    assert (table[~valid] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        sa.nn.EmissionHead(5, 4, 6, vocab_size=0)
