"""The emission options of Seq2Seq: the batch-vocabulary softmax and the lexical emission."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structattn.data.batching import collate_seq2seq
from structattn.data.vocab import Vocab
from structattn.infer.readout import gather
from structattn.models.seq2seq import MODES, Seq2Seq
from structattn.nn.heads import EmissionHead
from tests.test_seq2seq import assert_loss_falls

torch.set_num_threads(1)

PAIRS = [("abc", "xyz"), ("ba", "yx"), ("cab", "zxyw"), ("a", "x"), ("bb", "yy"),
         ("dc", "zvu"), ("acb", "xzy"), ("ca", "zx")]


class _Pair:
    def __init__(self, source, target):
        self.source, self.target = tuple(source), tuple(target)


def _toy(pairs=PAIRS):
    examples = [_Pair(s, t) for s, t in pairs]
    source_vocab = Vocab.build([e.source for e in examples])
    target_vocab = Vocab.build([e.target for e in examples])
    return collate_seq2seq(examples, source_vocab, target_vocab), source_vocab, target_vocab


def _model(mode, source_vocab, target_vocab, **options):
    torch.manual_seed(0)
    return Seq2Seq(len(source_vocab), len(target_vocab), mode=mode, embed_dim=6, hidden=8,
                   pad_id=target_vocab.pad_id, bos_id=target_vocab.bos_id,
                   eos_id=target_vocab.eos_id, **options)


def _head(lexical_dim=0, vocab=11, dtype=torch.float64, stateful=True):
    torch.manual_seed(1)
    return EmissionHead(5, 7, 6, vocab, lexical_dim=lexical_dim, stateful=stateful).to(dtype)


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lexical_dim", [0, 3])
def test_restricted_softmax_is_the_full_softmax_renormalised_over_the_vocabulary(
        scale, dtype, lexical_dim):
    head = _head(lexical_dim, dtype=dtype)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.mul_(scale)
    states, context = torch.randn(4, 5, dtype=dtype), torch.randn(4, 7, dtype=dtype)
    vocabulary = torch.tensor([1, 4, 5, 9])
    targets = torch.tensor([4, 9, 1, 4])
    full = head.logits(states, context).log_softmax(-1)
    restricted = full[:, vocabulary] - full[:, vocabulary].logsumexp(-1, keepdim=True)
    expected = restricted.gather(-1, torch.tensor([[1], [3], [0], [1]])).squeeze(-1)
    found = head.log_prob(states, context, targets, vocabulary)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(found, expected, atol=tolerance * scale, rtol=tolerance)
    # the full vocabulary as the "restriction" changes nothing
    assert torch.allclose(head.log_prob(states, context, targets, torch.arange(11)),
                          head.log_prob(states, context, targets), atol=tolerance * scale)


@given(st.lists(st.integers(0, 10), min_size=1, max_size=11, unique=True), st.integers(0, 3))
def test_restricted_probabilities_sum_to_one_over_any_vocabulary(words, lexical_dim):
    head = _head(lexical_dim)
    vocabulary = torch.tensor(sorted(words))
    states, context = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    total = torch.stack([
        head.log_prob(states, context, word.expand(3), vocabulary) for word in vocabulary
    ]).logsumexp(0)
    assert torch.allclose(total, torch.zeros(3, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("stateful", [True, False])
@pytest.mark.parametrize("lexical_dim", [0, 3])
@pytest.mark.parametrize("restrict", [False, True])
def test_emission_table_matches_log_prob_at_every_key(lexical_dim, restrict, stateful):
    head = _head(lexical_dim, stateful=stateful)
    batch, length, keys = 2, 3, 4
    states = torch.randn(batch, length, 5, dtype=torch.float64)
    values = torch.randn(batch, keys, 7, dtype=torch.float64)
    targets = torch.tensor([[2, 7, 2], [9, 3, 0]])
    target_mask = torch.tensor([[True, True, True], [True, True, False]])
    key_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    vocabulary = torch.tensor([0, 2, 3, 7, 9]) if restrict else None
    table = head.table(states, values, targets, target_mask, key_mask, chunk_elements=7,
                       vocabulary=vocabulary)
    for b, t, k in itertools.product(range(batch), range(length), range(keys)):
        if target_mask[b, t] and key_mask[b, k]:
            expected = head.log_prob(states[b, t], values[b, k], targets[b, t], vocabulary)
            assert torch.allclose(table[b, t, k], expected)
        else:
            assert table[b, t, k] == 0


@pytest.mark.parametrize("stateful", [True, False])
def test_restricted_emission_table_has_exact_gradients(stateful):
    head = _head(3, stateful=stateful)
    states = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[4, 1], [9, 4]])
    vocabulary = torch.tensor([1, 4, 6, 9])
    assert torch.autograd.gradcheck(
        lambda s, v: head.table(s, v, targets, vocabulary=vocabulary), (states, values))


def test_lexical_term_reads_only_the_last_context_features():
    head = _head(3)
    states, context = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    with torch.no_grad():
        head.combine_context.weight[:, -3:] = 0.0  # leave only the direct path to those features
    changed = context.clone()
    changed[:, -3:] += 1.0
    difference = head.logits(states, changed) - head.logits(states, context)
    assert torch.allclose(difference, head.lexical.weight.sum(-1).expand(2, -1))


def test_a_word_only_emission_ignores_the_contextual_features():
    torch.manual_seed(1)
    head = EmissionHead(5, 7, 6, 11, lexical_dim=3, contextual=False).double()
    states, context = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    changed = context.clone()
    changed[:, :4] = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(head.logits(states, changed), head.logits(states, context))
    changed[:, 4:] += 1.0
    assert not torch.allclose(head.logits(states, changed), head.logits(states, context))


def test_word_only_seq2seq_posterior_follows_the_source_word_not_its_neighbours():
    batch, source_vocab, target_vocab = _toy()
    model = _model("marginal", source_vocab, target_vocab, lexical_emission=True,
                   contextual_emission=False).double().eval()
    pieces = model.pieces(batch)
    table = model.emission_table(pieces)
    # the same source word at two positions of one verse gives the same emission there
    b = next(i for i, (s, _) in enumerate(PAIRS) if s == "bb")
    assert torch.allclose(table[b, :, 0], table[b, :, 1])
    contextual = _model("marginal", source_vocab, target_vocab).double().eval()
    other = contextual.emission_table(contextual.pieces(batch))
    assert not torch.allclose(other[b, :2, 0], other[b, :2, 1])


def test_lexical_emission_scores_sampled_contexts_under_enumeration_dims():
    batch_data, source_vocab, target_vocab = _toy()
    model = _model("marginal", source_vocab, target_vocab, lexical_emission=True).double()
    pieces = model.pieces(batch_data)
    batch, steps = pieces.targets.shape
    assert pieces.enc.shape == (batch, batch_data.source.shape[1], 8 + 6)
    # Pyro's enumeration puts the S values of z in a new leading dim
    sources = pieces.enc.shape[1]
    z = torch.arange(sources).view(sources, 1, 1).expand(sources, batch, steps)
    scored = model.head.log_prob(pieces.states, gather(pieces.enc, z), pieces.targets)
    assert scored.shape == (sources, batch, steps)
    table = model.emission_table(pieces)
    real = pieces.target_mask[:, :, None] & pieces.source_mask[:, None, :]
    assert torch.allclose(scored.permute(1, 2, 0)[real], table[real])


@pytest.mark.parametrize(("contextual", "stateful"), [(True, True), (False, True),
                                                      (False, False)])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_with_the_emission_options(mode, contextual, stateful):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab, lexical_emission=True,
                   contextual_emission=contextual, stateful_emission=stateful,
                   batch_vocabulary=True)
    assert_loss_falls(model, batch, steps=25)
    model.eval()
    assert len(model.beam_search(batch.source, batch.source_mask, beam_size=2,
                                 max_length=5)) == len(batch)


def test_batch_vocabulary_is_the_batch_words_while_training_and_none_in_evaluation():
    batch, source_vocab, target_vocab = _toy(PAIRS[:2])  # no z, v, u, w in these targets
    model = _model("marginal", source_vocab, target_vocab, batch_vocabulary=True)
    words = model.pieces(batch).vocabulary
    expected = {target_vocab.pad_id, target_vocab.eos_id} | {
        target_vocab.index(symbol) for symbol in "xyz"}
    assert set(words.tolist()) == expected
    assert model.eval().pieces(batch).vocabulary is None
    assert _model("marginal", source_vocab, target_vocab).pieces(batch).vocabulary is None


def test_batch_vocabulary_training_likelihood_is_the_restricted_mixture():
    batch, source_vocab, target_vocab = _toy()
    model = _model("marginal", source_vocab, target_vocab, batch_vocabulary=True,
                   lexical_emission=True).double()
    model.dropout.p = 0.0
    pieces = model.pieces(batch)
    vocabulary = pieces.vocabulary
    prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
    found = model.strategy.token_log_likelihood(model, pieces)
    for b, t in itertools.product(range(len(batch)), range(pieces.targets.shape[1])):
        if not pieces.target_mask[b, t]:
            continue
        terms = []
        for k in range(int(batch.source_mask[b].sum())):
            logits = model.output_logits(pieces.states[b, t], pieces.enc[b, k])[vocabulary]
            word = int((vocabulary == pieces.targets[b, t]).nonzero())
            terms.append(prior.attention[b, t, k].log() + logits.log_softmax(-1)[word])
        assert torch.allclose(found[b, t], torch.stack(terms).logsumexp(0))


def test_bad_emission_options_are_refused_by_name():
    with pytest.raises(ValueError, match="lexical_dim"):
        EmissionHead(5, 7, 6, 11, lexical_dim=8)
    head = _head()
    states, context = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="vocabulary must contain"):
        head.log_prob(states, context, torch.tensor([1, 2]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="vocabulary"):
        head.logits(states, context, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="vocabulary"):
        head.logits(states, context, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="contextual=False"):
        EmissionHead(5, 7, 6, 11, contextual=False)
    _, source_vocab, target_vocab = _toy()
    with pytest.raises(ValueError, match="lexical_emission"):
        _model("soft", source_vocab, target_vocab, lexical_emission=1)
    with pytest.raises(ValueError, match="contextual_emission"):
        _model("soft", source_vocab, target_vocab, contextual_emission=False)


@pytest.mark.parametrize("mode", ["marginal", "variational-enum"])
def test_state_free_decoding_scores_the_exact_per_token_likelihood(mode):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab, lexical_emission=True,
                   contextual_emission=False, stateful_emission=False).double().eval()
    expected = model.token_log_likelihood(batch)
    enc = model.encode(batch.source, batch.source_mask)
    memory = model.strategy.start_decoding(model, enc, batch.source_mask)
    assert memory.shape == (len(batch), enc.shape[1], len(target_vocab))
    assert torch.allclose(memory.sum(-1), torch.ones(memory.shape[:-1], dtype=memory.dtype))
    states, _ = model.decode(batch.target[:, :-1])
    for t in range(states.shape[1]):
        step = model.next_log_probs(states[:, t:t + 1], enc, batch.source_mask, memory)
        found = step.log_probs.gather(-1, batch.target[:, t + 1:t + 2]).squeeze(-1)
        real = batch.target_mask[:, t + 1]
        assert torch.allclose(found[real], expected[real, t])


def test_a_state_free_emission_ignores_the_decoder_state():
    head = _head(3, stateful=False)
    context = torch.randn(2, 7, dtype=torch.float64)
    first, second = (torch.randn(2, 5, dtype=torch.float64) for _ in range(2))
    assert torch.equal(head.logits(first, context), head.logits(second, context))
    assert torch.allclose(head.state_free_log_probs(context),
                          head.logits(first, context).log_softmax(-1))
    with pytest.raises(ValueError, match="stateful=False"):
        _head(3).state_free_log_probs(context)
