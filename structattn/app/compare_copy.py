"""Soft versus hard attention on the aligned-copy toy task, trained with the same budget.

``soft`` maximises the soft-attention likelihood (expected context inside the softmax);
``marginal`` maximises the exact marginal likelihood of hard attention (alignment summed out
by enumeration).  Both are then scored both ways and their alignments are compared with the
true one: the soft attention's argmax and the exact posterior MAP.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from structattn.app.outputs import RESULTS_NAME, claim_output, write_json
from structattn.app.plots import plot_alignments
from structattn.app.report import format_rows
from structattn.data.copy import aligned_copy_batch
from structattn.models.toy import AlignedCopyModel

__all__ = ["COPY_MODES", "compare_copy"]

COPY_MODES = ("soft", "marginal")


def _train(mode: str, args, progress: bool) -> tuple[AlignedCopyModel, float]:
    torch.manual_seed(args.seed)
    model = AlignedCopyModel(args.vocab, args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {mode}", disable=not progress, leave=False)
    for _ in bar:
        batch = aligned_copy_batch(args.batch_size, args.length, args.vocab, noise=args.noise,
                                   min_length=args.length // 2, generator=data).to(args.device)
        if mode == "soft":
            log_lik = model.soft_log_likelihood(batch)
        else:
            log_lik = model.marginal_log_likelihood(batch)
        loss = -log_lik / batch.tgt_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model, (time.perf_counter() - start) / max(args.steps, 1)


@torch.no_grad()
def _evaluate(model: AlignedCopyModel, args) -> tuple[dict, dict]:
    batch = aligned_copy_batch(args.eval_size, args.length, args.vocab, noise=args.noise,
                               min_length=args.length // 2,
                               generator=torch.Generator().manual_seed(args.seed + 1))
    batch = batch.to(args.device)
    tokens = batch.tgt_mask.sum()
    found = model.alignments(batch)
    correct = lambda z: ((z == batch.alignment) & batch.tgt_mask).sum().item() / tokens.item()  # noqa: E731
    metrics = {
        "soft_nll": -model.soft_log_likelihood(batch).item() / tokens.item(),
        "marginal_nll": -model.marginal_log_likelihood(batch).item() / tokens.item(),
        "align_acc_soft_argmax": correct(found["soft_argmax"]),
        "align_acc_posterior_map": correct(found["posterior_map"]),
    }
    length = int(batch.tgt_mask[0].sum())
    example = {key: found[key][0, :length, :length].cpu() for key in ("soft", "posterior")}
    example["soft_argmax"] = found["soft_argmax"][0, :length].cpu()
    example["posterior_map"] = found["posterior_map"][0, :length].cpu()
    return metrics, example


def compare_copy(args, progress: bool = True) -> list[dict]:
    """Train every mode in ``args.modes`` on the copy task; print, and write ``args.out``
    (refused if it holds an earlier comparison's results, unless ``args.overwrite``)."""
    with claim_output(args.out, getattr(args, "overwrite", False)):
        return _compare(args, progress)


def _compare(args, progress: bool) -> list[dict]:
    rows, examples = [], {}
    for mode in args.modes:
        model, seconds = _train(mode, args, progress)
        metrics, example = _evaluate(model, args)
        rows.append({"mode": mode, **metrics, "ms_per_step": 1000 * seconds,
                     "seconds": seconds * args.steps})
        examples[mode] = example
    print(format_rows(rows, ["soft_nll", "marginal_nll", "align_acc_soft_argmax",
                                "align_acc_posterior_map", "ms_per_step"]))
    print("\nalignment of one held-out example (true: target t reads source t)")
    for mode, example in examples.items():
        print(f"  {mode:9s} soft argmax   : {' '.join(map(str, example['soft_argmax'].tolist()))}")
        print(f"  {mode:9s} posterior MAP : "
              f"{' '.join(map(str, example['posterior_map'].tolist()))}")
    if args.out:
        out = Path(args.out)
        write_json(out / RESULTS_NAME, rows, indent=2)
        panels = {}
        for mode, example in examples.items():
            panels[f"{mode}: soft attention"] = example["soft"]
            panels[f"{mode}: exact posterior"] = example["posterior"]
        plot_alignments(panels, out / "copy_alignments.png",
                        title="aligned copy: soft attention vs hard-attention posterior")
        print(f"\nwrote {out / 'results.json'} and {out / 'copy_alignments.png'}")
    return rows
