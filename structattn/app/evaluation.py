"""Score one trained seq2seq model on a split: corpus metrics and the per-example counts.

Every metric is kept as per-example counts (see :mod:`structattn.app.stats`), so the
comparison can bootstrap over examples and test modes against each other on the same examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from structattn.app.experiment import ExperimentConfig, eval_batches
from structattn.app.metrics import attention_to_links
from structattn.app.stats import ALIGNMENT_READINGS, METRICS, alignment_counts
from structattn.app.tasks import Seq2SeqTask, TaskData, get_task
from structattn.models.seq2seq import Seq2Seq

__all__ = ["Evaluation", "evaluate_mode", "gold_target_mask", "reading_links"]

# (reading, alignment key, threshold): the attention's argmax, the posterior's MAP, and the
# posterior marginals above one half
_READINGS = (("prior_argmax", "prior", None), ("posterior_map", "posterior", None),
             ("posterior_marginals", "posterior", 0.5))
assert tuple(r[0] for r in _READINGS) == ALIGNMENT_READINGS


@dataclass
class Evaluation:
    """A model's scores on the evaluated examples (in the order of ``examples``).

    Attributes:
        metrics: metric name -> corpus value.
        counts: metric name -> per-example counts ``(examples, columns)``.
        hypotheses: the beam-search output of each example.
        attention: per example the ``(target_len, source_len)`` attention weights
            ``p(z_t | x, y_<t)`` on the reference target (eos row included).
        posterior: per example the exact hard-attention posterior ``p(z_t | x, y)``.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    hypotheses: list[list[str]] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)
    posterior: list[np.ndarray] = field(default_factory=list)


def gold_target_mask(example: Any, task: Seq2SeqTask, length: int) -> torch.Tensor:
    """``(length,)`` True at target positions that carry a reference link."""
    mask = torch.zeros(length, dtype=torch.bool)
    linked = [t for t in task.linked_targets(example) if t < length]
    mask[linked] = True
    return mask


def reading_links(matrix: torch.Tensor, threshold: float | None,
                  target_mask: torch.Tensor) -> set[tuple[int, int]]:
    """Links ``(source, target)`` of one ``(target_len, source_len)`` alignment matrix."""
    return attention_to_links(matrix, threshold=threshold, target_mask=target_mask)


@torch.no_grad()
def evaluate_mode(
    model: Seq2Seq,
    config: ExperimentConfig,
    data: TaskData,
    split: str = "test",
    examples: Sequence[Any] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Perplexity, the task's metrics and (with reference links) alignment scores.

    Args:
        model: a trained model (put in eval mode here).
        config: the run (``eval_size``: how many examples of ``split``; ``None`` = all).
        data: the task's data.
        split: ``"dev"`` or ``"test"``.
        examples: evaluate these instead of ``split``.
        progress: a bar over the evaluated examples.
    """
    from tqdm.auto import tqdm

    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    task = get_task(config.task)
    assert isinstance(task, Seq2SeqTask)
    model.eval()
    if examples is None:
        examples = list(getattr(data, split))[:config.eval_size]
    rows: dict[str, list[list[float]]] = {}
    result = Evaluation()
    likelihood: list[list[float]] = [[0.0, 0.0]] * len(examples)
    hypotheses: list[list[str] | None] = [None] * len(examples)
    attention: list[np.ndarray | None] = [None] * len(examples)
    posterior: list[np.ndarray | None] = [None] * len(examples)
    bar = tqdm(total=len(examples), desc=f"test {config.mode}", unit="example",
               disable=not progress, dynamic_ncols=True, leave=False)
    # length-sorted batches pad little; results are put back in the examples' order
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].source), i))
    ordered = [examples[i] for i in order]
    batch_size = 2 * config.batch_size
    with bar:
        for batch in eval_batches(ordered, data, batch_size, config.device):
            nll = -model.log_likelihood(batch)
            max_length = int(batch.target_mask.sum(-1).max()) + 10
            outputs = model.beam_search(batch.source, batch.source_mask, config.beam_size,
                                        max_length)
            found = model.alignments(batch)
            for row in range(len(batch)):
                index = order[int(batch.indices[row])]
                source_len = int(batch.source_mask[row].sum())
                target_len = int(batch.target_mask[row, 1:].sum())
                hypotheses[index] = data.target_vocab.decode(outputs[row])
                prior = found["prior"][row, :target_len, :source_len].float().cpu()
                post = found["posterior"][row, :target_len, :source_len].float().cpu()
                attention[index] = prior.numpy()
                posterior[index] = post.numpy()
                likelihood[index] = [float(nll[row]), float(target_len)]
            bar.update(len(batch))
    rows["ppl"] = likelihood
    for example, hypothesis in zip(examples, hypotheses, strict=True):
        for name, counts in task.score(example, hypothesis).items():
            rows.setdefault(name, []).append(counts)
    if task.has_gold_links:
        for index, example in enumerate(examples):
            matrices = {"prior": torch.from_numpy(attention[index]),
                        "posterior": torch.from_numpy(posterior[index])}
            mask = gold_target_mask(example, task, matrices["prior"].shape[0])
            for reading, key, threshold in _READINGS:
                links = reading_links(matrices[key], threshold, mask)
                counts = alignment_counts(links, set(example.sure), set(example.possible))
                for kind in ("aer", "precision", "recall"):
                    rows.setdefault(f"{kind}_{reading}", []).append(counts)
    for name, table in rows.items():
        array = np.asarray(table, dtype=np.float64)
        result.counts[name] = array
        result.metrics[name] = METRICS[name].value(array)
    result.hypotheses = [list(h) for h in hypotheses]
    result.attention = list(attention)
    result.posterior = list(posterior)
    return result
