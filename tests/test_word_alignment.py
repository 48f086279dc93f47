"""IBM Model 1 and the HMM aligner: Pyro models against hand-written exact computations."""

import itertools
import math

import pytest
import torch

from structattn.models.word_alignment import (
    ALIGNERS,
    SYMMETRIZERS,
    HMMAligner,
    IBM1Aligner,
    WordAligner,
    fit_by_agreement,
    grow_diag_final_and,
    hmm_markov_model,
    hmm_model,
    pyro_log_likelihood,
    register_aligner,
    train_aligner,
)


def _pairs(count=24, seed=0):
    """Synthetic pairs: the target is the source reversed, word by word, plus a stray word."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(count):
        length = int(torch.randint(1, 5, (1,), generator=generator))
        words = torch.randperm(8, generator=generator)[:length].tolist()
        target = [f"y{w}" for w in reversed(words)] + (["stray"] if i % 4 == 0 else [])
        pairs.append(([f"x{w}" for w in words], target))
    return pairs


def _brute_force_ibm1(aligner, pair):
    """Log-likelihood, best alignment and posteriors of IBM1 by listing every alignment."""
    source, target = pair
    table = _table(aligner, pair)
    num_sources = len(source)
    scores = {}
    for z in itertools.product(range(num_sources + 1), repeat=len(target)):
        scores[z] = sum(float(table[t, s]) - math.log(num_sources + 1) for t, s in enumerate(z))
    return scores


def _table(aligner, pair):
    """``(T, S + 1)`` log t(y | x) (last column NULL), read from the vocabularies directly."""
    source, target = pair
    rows = [aligner.source_vocab.ids[w] for w in source] + [aligner.source_vocab.null_id]
    columns = [aligner.target_vocab.ids[w] for w in target]
    return aligner.log_t[rows][:, columns].T.double()


def _brute_force_hmm(aligner, pair):
    """Every HMM state sequence's log joint, from the generative story."""
    source, target = pair
    table = _table(aligner, pair)
    num_sources = len(source)
    jumps = aligner.jump_scores.detach().double()
    max_jump = jumps.shape[0] // 2
    p0 = aligner.null_probability

    def log_move(previous, nxt):
        def bucket(d):
            return min(max(d, -max_jump), max_jump) + max_jump
        row = torch.stack([jumps[bucket(i - previous)] for i in range(num_sources)])
        return float(jumps[bucket(nxt - previous)] - torch.logsumexp(row, 0))

    scores = {}
    for z in itertools.product(range(2 * num_sources), repeat=len(target)):
        score, previous, ok = 0.0, -1, True
        for t, state in enumerate(z):
            position, null = state % num_sources, state >= num_sources
            if null:
                if t > 0 and position != previous:
                    ok = False
                    break
                score += (log_move(-1, position) if t == 0 else 0.0) + math.log(p0)
                score += float(table[t, num_sources])
            else:
                score += log_move(previous, position) + math.log(1 - p0)
                score += float(table[t, position])
            previous = position
        if ok:
            scores[z] = score
    return scores


def _positions(z, num_sources):
    return tuple(num_sources if s >= num_sources else s for s in z)


def _trained(name, backend):
    aligner = train_aligner(name, _pairs(), epochs=2, initial_epochs=2, backend=backend,
                            max_cells=60)
    return aligner


@pytest.mark.parametrize("backend", ["torch", "pyro"])
@pytest.mark.parametrize("name", ["ibm1", "hmm"])
def test_log_likelihood_viterbi_and_posteriors_match_brute_force(name, backend):
    aligner = _trained(name, backend)
    brute_force = _brute_force_ibm1 if name == "ibm1" else _brute_force_hmm
    pairs = _pairs(6, seed=1)
    pairs = [p for p in pairs if len(p[0]) <= 3 and len(p[1]) <= 4][:4]
    posteriors = aligner.posteriors(pairs)
    viterbi = aligner.viterbi(pairs)
    for pair, posterior, best in zip(pairs, posteriors, viterbi, strict=True):
        scores = brute_force(aligner, pair)
        num_sources = len(pair[0])
        log_z = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
        batch = aligner.batches([pair])[0]
        value = aligner.log_likelihood(batch, aligner.table(batch)).detach()
        assert float(value) == pytest.approx(float(log_z), abs=1e-3)
        expected = torch.zeros(len(pair[1]), num_sources + 1, dtype=torch.float64)
        for z, score in scores.items():
            for t, s in enumerate(_positions(z, num_sources)):
                expected[t, s] += math.exp(score - log_z)
        torch.testing.assert_close(posterior.double(), expected, atol=1e-4, rtol=0)
        top = max(scores, key=scores.get)
        found = tuple(best.tolist())
        best_found = max(s for z, s in scores.items() if _positions(z, num_sources) == found)
        assert found == _positions(top, num_sources) or abs(best_found - scores[top]) < 1e-4


@pytest.mark.parametrize("name", ["ibm1", "hmm"])
def test_pyro_model_and_hand_written_baseline_train_to_the_same_table(name):
    torch_aligner = _trained(name, "torch")
    pyro_aligner = _trained(name, "pyro")
    torch.testing.assert_close(pyro_aligner.log_t, torch_aligner.log_t, atol=1e-4, rtol=1e-4)
    pairs = _pairs(8, seed=2)
    assert pyro_aligner.align(pairs) == torch_aligner.align(pairs)


def test_collapsed_pyro_hmm_equals_the_enumerated_markov_chain_in_value_and_gradient():
    """The training model (chain summed by HMMAlignment, Trace_ELBO) against the chain written
    out with one enumerated site per word (TraceEnum_ELBO's own contraction)."""
    import pyro

    aligner = _trained("hmm", "torch")
    batch = aligner.batches(_pairs(10, seed=3))[0]
    values, grads = [], []
    for model, elbo in ((hmm_model, pyro.infer.Trace_ELBO),
                        (hmm_markov_model, pyro.infer.TraceEnum_ELBO)):
        table = aligner.table(batch).double().requires_grad_(True)
        jumps = aligner.jump_scores.detach().double().requires_grad_(True)
        value = pyro_log_likelihood(model, 1, batch, table, jumps, aligner.null_probability,
                                    elbo_class=elbo)
        values.append(value)
        grads.append(torch.autograd.grad(value, [table, jumps]))
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-9)
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)


def test_em_raises_the_likelihood_and_learns_the_reversal():
    pairs = _pairs(60)
    history = []
    aligner = IBM1Aligner().fit(pairs, 4, log_every=lambda epoch, value: history.append(value))
    assert all(b >= a - 1e-3 for a, b in zip(history, history[1:], strict=False))
    hmm = train_aligner("hmm", pairs, epochs=4, initial_epochs=3)
    links = hmm.align(pairs, "viterbi")
    correct = sum(len(pair[0]) - 1 - t == s for pair, found in zip(pairs, links, strict=True)
                  for s, t in found if t < len(pair[0]))
    total = sum(len(pair[0]) for pair in pairs)
    assert correct / total > 0.9
    assert aligner.align(pairs, "posterior", threshold=0.5)


def test_training_by_agreement_learns_the_reversal_in_both_directions():
    pairs = _pairs(60)
    forward, backward = fit_by_agreement(IBM1Aligner(), IBM1Aligner(), pairs, epochs=3)
    hmm = (HMMAligner(max_jump=3), HMMAligner(max_jump=3))
    for aligner, start in zip(hmm, (forward, backward), strict=True):
        aligner.source_vocab, aligner.target_vocab, aligner.log_t = (
            start.source_vocab, start.target_vocab, start.log_t)
    fit_by_agreement(*hmm, pairs, epochs=3)
    forward_links = hmm[0].align(pairs, "viterbi")
    backward_links = [{(s, t) for t, s in found}
                      for found in hmm[1].align([(t, s) for s, t in pairs], "viterbi")]
    for found in (forward_links, backward_links):
        correct = sum(len(source) - 1 - t == s for (source, _), links in zip(pairs, found,
                                                                            strict=True)
                      for s, t in links)
        assert correct / sum(len(source) for source, _ in pairs) > 0.9


def test_agreement_needs_pairs_and_non_negative_epochs():
    with pytest.raises(ValueError, match="epochs"):
        fit_by_agreement(IBM1Aligner(), IBM1Aligner(), _pairs(), epochs=-1)
    with pytest.raises(ValueError, match="pairs"):
        fit_by_agreement(IBM1Aligner(), IBM1Aligner(), [], epochs=1)


def test_unknown_words_align_without_error():
    aligner = train_aligner("hmm", _pairs(), epochs=1, initial_epochs=1)
    links = aligner.align([(["never", "seen"], ["nunca", "visto", "y0"])])
    assert all(s < 2 and t < 3 for s, t in links[0])


def test_grow_diag_final_and_grows_from_the_intersection():
    forward = {(0, 0), (1, 1), (2, 1)}
    backward = {(0, 0), (1, 1), (3, 3)}
    assert SYMMETRIZERS["intersection"](forward, backward) == {(0, 0), (1, 1)}
    # (2, 1) neighbours (1, 1) and covers the unaligned source word 2; (3, 3) is isolated but
    # both of its words are unaligned, so the final-and step adds it
    assert grow_diag_final_and(forward, backward) == {(0, 0), (1, 1), (2, 1), (3, 3)}


def test_registry_accepts_user_aligners_and_rejects_unknown_names():
    @register_aligner("ibm1-copy")
    class Copy(IBM1Aligner):
        pass

    assert ALIGNERS["ibm1-copy"] is Copy
    del ALIGNERS["ibm1-copy"]
    with pytest.raises(ValueError, match="name"):
        train_aligner("ibm9", _pairs())
    with pytest.raises(ValueError, match="WordAligner"):
        register_aligner("x")(int)
    assert issubclass(HMMAligner, WordAligner)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="jax"), "backend"),
    (dict(null_probability=1.0), "null_probability"),
    (dict(max_jump=0), "max_jump"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMMAligner(**kwargs)


def test_decoding_must_be_known():
    aligner = IBM1Aligner().fit(_pairs(), 1)
    with pytest.raises(ValueError, match="decoding"):
        aligner.align(_pairs(2), "beam")


def test_example_runs_in_smoke_test_mode(tmp_path):
    import importlib.util
    from pathlib import Path

    bible = pytest.importorskip("structattn.data.bible")
    try:
        bible.sword_module_path("engKJV2006eb")
        bible.sword_module_path("spaRV1909eb")
    except bible.SwordModuleNotFoundError:
        pytest.skip("SWORD Bible modules are not installed")
    path = Path(__file__).resolve().parent.parent / "examples" / "word_alignment.py"
    spec = importlib.util.spec_from_file_location("word_alignment_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(["--smoke-test", "--out", str(tmp_path), "--save-links"])
    results = example.main(args)
    assert (tmp_path / "results.json").exists() and (tmp_path / "hmm_links.txt").exists()
    assert 0.0 <= results["hmm grow-diag-final-and viterbi"]["aer"] <= 1.0


def test_posterior_average_keeps_links_both_directions_support_on_average():
    from structattn.models.word_alignment import posterior_average_links

    forward = torch.tensor([[0.9, 0.0, 0.1], [0.2, 0.4, 0.4]])  # (T=2, S=2 + NULL)
    backward = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.8, 0.2]])  # (S=2, T=2 + NULL)
    assert posterior_average_links(forward, backward, 0.5) == {(0, 0), (1, 1)}
    assert posterior_average_links(forward, backward, 0.25) == {(0, 0), (1, 1), (0, 1)}
    with pytest.raises(ValueError, match="backward"):
        posterior_average_links(forward, backward.T, 0.5)


def test_ibm1_batches_are_sized_by_its_emission_table_not_the_chain():
    pairs = _pairs(40)
    ibm1 = IBM1Aligner(max_cells=200).fit(pairs, 1)
    hmm = HMMAligner(max_cells=200)
    hmm.source_vocab, hmm.target_vocab, hmm.log_t = ibm1.source_vocab, ibm1.target_vocab, ibm1.log_t
    assert len(ibm1.batches(pairs)) < len(hmm.batches(pairs))
    for batch in hmm.batches(pairs):
        source, target = batch.source.shape[1], batch.target.shape[1]
        assert len(batch.indices) == 1 or len(batch.indices) * target * source**2 <= 200
