"""The aligned-copy task, its model, the comparison CLI and the plots."""

import json

import pytest
import torch

from structattn.app.cli import main
from structattn.app.plots import plot_alignments
from structattn.data.copy import aligned_copy_batch, copy_permutation
from structattn.models.toy import AlignedCopyModel

torch.set_num_threads(1)


def test_copy_batch_targets_read_their_own_position():
    batch = aligned_copy_batch(
        16, 9, 20, noise=0.0, min_length=3, generator=torch.Generator().manual_seed(0)
    )
    perm = copy_permutation(20)
    real = batch.tgt_mask
    assert torch.equal(batch.tgt[real], perm[batch.src][real])
    assert torch.equal(batch.alignment[real], torch.arange(9).expand(16, 9)[real])
    assert real.sum(-1).min() >= 3


def test_copy_batch_rejects_bad_arguments():
    with pytest.raises(ValueError):
        aligned_copy_batch(4, 5, 10, noise=1.5)
    with pytest.raises(ValueError):
        aligned_copy_batch(4, 5, 10, min_length=6)


def test_marginal_likelihood_equals_brute_force_sum_over_alignments():
    torch.manual_seed(0)
    model = AlignedCopyModel(7, 8).double()
    batch = aligned_copy_batch(2, 3, 7, min_length=2, generator=torch.Generator().manual_seed(1))
    prior, enc, states = model(batch)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(2):
        for t in range(int(batch.tgt_mask[b].sum())):
            terms = []
            for k in range(int(batch.src_mask[b].sum())):
                logits = model.emission_logits(states[b, t], enc[b, k])
                terms.append(prior.logits[b, t, k] + logits.log_softmax(-1)[batch.tgt[b, t]])
            total = total + torch.stack(terms).logsumexp(0)
    assert torch.allclose(model.marginal_log_likelihood(batch), total)


@pytest.mark.parametrize("field", ["src", "tgt"])
def test_token_ids_outside_the_vocabulary_are_refused_by_name(field):
    model = AlignedCopyModel(7, 8)
    batch = aligned_copy_batch(2, 3, 7, generator=torch.Generator().manual_seed(1))
    getattr(batch, field)[0, 0] = 7
    with pytest.raises(ValueError, match=f"batch.{field}"):
        model.soft_log_likelihood(batch)


def test_the_soft_likelihood_uses_the_shared_emission_head():
    torch.manual_seed(0)
    model = AlignedCopyModel(7, 8).double()
    batch = aligned_copy_batch(2, 3, 7, generator=torch.Generator().manual_seed(1))
    prior, enc, states = model(batch)
    context = prior.attention @ enc
    logits = model.head.out(torch.tanh(model.head.combine_state(states)
                                       + model.head.combine_context(context)))
    token = logits.log_softmax(-1).gather(-1, batch.tgt.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(model.soft_log_likelihood(batch), token[batch.tgt_mask].sum())


@pytest.mark.parametrize("objective", ["soft_log_likelihood", "marginal_log_likelihood"])
def test_both_objectives_train(objective):
    torch.manual_seed(0)
    model = AlignedCopyModel(12, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        batch = aligned_copy_batch(16, 6, 12, min_length=3, generator=data)
        loss = -getattr(model, objective)(batch) / batch.tgt_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_compare_cli_writes_results_and_plot(tmp_path, capsys):
    code = main(
        [
            "compare",
            "--task",
            "copy",
            "--quick",
            "--steps",
            "5",
            "--hidden",
            "8",
            "--eval-size",
            "8",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["mode"] for row in rows] == ["soft", "marginal"]
    for row in rows:
        assert {
            "soft_nll",
            "marginal_nll",
            "align_acc_soft_argmax",
            "align_acc_posterior_map",
            "seconds",
        } <= set(row)
        assert 0.0 <= row["align_acc_posterior_map"] <= 1.0
    assert (tmp_path / "copy_alignments.png").stat().st_size > 1000
    assert "posterior MAP" in capsys.readouterr().out


def test_compare_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--task",
        "--modes",
        "--steps",
        "--batch-size",
        "--device",
        "--quick",
        "--out",
        "--max-train",
        "--beam-size",
        "--threads",
    ):
        assert flag in text


def test_compare_cli_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        main(["compare", "--task", "copy", "--modes", "soft,telepathy"])


def test_plot_alignments_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        plot_alignments({"a": torch.rand(3, 4), "b": torch.rand(3, 5)}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_alignments({}, tmp_path / "x.png")
