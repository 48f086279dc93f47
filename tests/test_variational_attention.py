"""Variational attention in Seq2Seq: the guide reads the emission's evidence, stays a guide (the
ELBO is a strict bound), and with a word-translation emission it learns the exact posterior fast
where the evidence-free guide of Deng et al. lags behind."""

import pytest
import torch

from structattn.data.batching import Seq2SeqBatch
from structattn.infer.exact import posterior
from structattn.models.modes import (
    SEQ2SEQ_MODES,
    HardScoreMode,
    LatentMode,
    ModeOptions,
    PlainVariationalEnumMode,
    VariationalEnumMode,
)
from structattn.models.seq2seq import Seq2Seq

torch.set_num_threads(1)

PAD, BOS, EOS, AND = 0, 1, 2, 3
WORD_OPTIONS = dict(lexical_emission=True, contextual_emission=False, stateful_emission=False)


def _word_alignment_batch(generator, size, words):
    """Source: ``AND`` then 2-5 distinct content words; target: the same ids (their
    translations) in a random order.  Returns the batch and the gold source position of every
    target word (the order is random, so only the words tell where a target word aligns)."""
    sources, targets, gold = [], [], []
    for _ in range(size):
        count = int(torch.randint(2, 6, (1,), generator=generator))
        content = (torch.randperm(words, generator=generator)[:count] + 4).tolist()
        order = torch.randperm(count, generator=generator).tolist()
        sources.append([AND] + content)
        targets.append([content[i] for i in order])
        gold.append([i + 1 for i in order])
    width, length = max(map(len, sources)), max(map(len, targets)) + 2
    source = torch.tensor([s + [PAD] * (width - len(s)) for s in sources])
    target = torch.tensor([[BOS] + t + [EOS] + [PAD] * (length - 2 - len(t)) for t in targets])
    batch = Seq2SeqBatch(source, source != PAD, target, target != PAD, torch.arange(size))
    return batch, gold


def _train_on_word_alignment(mode, steps, words=300):
    torch.manual_seed(0)
    model = Seq2Seq(words + 4, words + 4, mode=mode, embed_dim=16, hidden=32, **WORD_OPTIONS)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    stream = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch, _ = _word_alignment_batch(stream, 32, words)
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test, gold = _word_alignment_batch(torch.Generator().manual_seed(2), 64, words)
    with torch.no_grad():
        pieces = model.pieces(test)
        prior = model.attention(pieces.states, pieces.enc, pieces.source_mask)
        exact = posterior(prior, model.emission_table(pieces))
        guide = model.strategy.guide(model, pieces).attention
    rows = torch.tensor([r for r, links in enumerate(gold) for _ in links])
    steps_ = torch.tensor([t for links in gold for t in range(len(links))])
    sources = torch.tensor([s for links in gold for s in links])
    return {
        "guide_accuracy": (guide[rows, steps_].argmax(-1) == sources).float().mean().item(),
        "posterior_accuracy": (exact[rows, steps_].argmax(-1) == sources).float().mean().item(),
        "distance": 0.5 * (guide[rows, steps_] - exact[rows, steps_]).abs().sum(-1).mean().item(),
    }


def test_guide_with_evidence_learns_the_exact_posterior_of_a_word_alignment_task():
    found = _train_on_word_alignment("variational-enum", steps=60)
    assert found["posterior_accuracy"] > 0.95, found
    assert found["guide_accuracy"] > 0.95, found
    assert found["distance"] < 0.05, found  # total variation from p(z | x, y), per target word


def test_guide_without_evidence_lags_behind_on_the_same_budget():
    plain = _train_on_word_alignment("variational-enum-plain", steps=60)
    assert plain["distance"] > 0.15, plain
    assert plain["guide_accuracy"] < 0.8, plain


def _small_batch():
    batch, _ = _word_alignment_batch(torch.Generator().manual_seed(0), 4, 6)
    return batch


@pytest.mark.parametrize("mode", ["variational-enum", "variational-enum-plain"])
def test_the_objective_is_a_strict_lower_bound_on_the_marginal_likelihood(mode):
    torch.manual_seed(0)
    model = Seq2Seq(10, 10, mode=mode, embed_dim=8, hidden=8, **WORD_OPTIONS)
    batch = _small_batch()
    elbo = -model.loss(batch)["objective"] * batch.num_target_tokens
    log_likelihood = model.log_likelihood(batch).sum()
    # a guide that were the exact posterior would close the gap
    assert elbo < log_likelihood - 1e-3


def test_the_guide_reads_the_emission_and_sends_it_no_gradient():
    torch.manual_seed(0)
    model = Seq2Seq(10, 10, mode="variational-enum", embed_dim=8, hidden=8, **WORD_OPTIONS)
    batch = _small_batch()
    before = model.guide(batch).attention
    with torch.no_grad():
        model.head.lexical.weight.mul_(3.0)
    after = model.guide(batch).attention
    assert not torch.allclose(before, after, atol=1e-4)
    # the guide's attention alone gives the emission no gradient: the table is a detached input
    (after * torch.randn(after.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert model.head.lexical.weight.grad is None
    assert model.strategy.inference.evidence_weight.grad is not None


def test_the_evidence_weight_is_trained_by_the_elbo():
    torch.manual_seed(0)
    model = Seq2Seq(10, 10, mode="variational-enum", embed_dim=8, hidden=8, **WORD_OPTIONS)
    model.loss(_small_batch())["loss"].backward()
    assert model.strategy.inference.evidence_weight.grad.abs() > 0
    assert model.head.lexical.weight.grad.abs().sum() > 0


def test_the_evidence_free_guide_is_a_registered_mode_without_the_weight():
    assert SEQ2SEQ_MODES["variational-enum-plain"] is PlainVariationalEnumMode
    assert issubclass(PlainVariationalEnumMode, VariationalEnumMode)
    model = Seq2Seq(10, 10, mode="variational-enum-plain", embed_dim=8, hidden=8)
    assert model.strategy.inference.evidence_weight is None


@pytest.mark.parametrize("base", [HardScoreMode, LatentMode])
def test_evidence_needs_an_exact_variational_mode(base):
    class Evidence(base):
        guide_evidence = True

    with pytest.raises(ValueError, match="guide_evidence"):
        Evidence(ModeOptions(embed_dim=8, hidden=8, target_vocab_size=10))
