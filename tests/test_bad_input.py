"""Every bad input to structattn's public functions and classes is a ValueError naming the argument.

One table: each row is a call that must fail and a pattern that the message must contain
(the argument's name, and where useful what is wrong with it).  A new public entry point
gets new rows here.
"""

from __future__ import annotations

import pytest
import torch

from structattn import functional
from structattn.data.batching import Seq2SeqBatches, bucket_by_length, pad_sequences
from structattn.data.bible import read_ztext
from structattn.data.copy import aligned_copy_batch
from structattn.data.text import load_parallel_text
from structattn.data.vocab import Vocab
from structattn.distributions import (
    CategoricalAlignment,
    HMMAlignment,
    NonProjectiveDependencyCRF,
    ProjectiveDependencyCRF,
    RelaxedAlignment,
    SegmentationAlignment,
    SparsemaxAlignment,
)
from structattn.infer import gather, gather_along, sample_alignment
from structattn.nn import LatentAttention, TransformerDecoderLayer, TransformerEncoderLayer
from structattn.nn.simplex import Entmax15, EntmaxBisect, Sparsemax

X = torch.randn(3, 4)
bisect = functional.entmax_bisect
Categorical = CategoricalAlignment
Sparse = SparsemaxAlignment
MAPS = {
    "masked_softmax": functional.masked_softmax,
    "sparsemax": functional.sparsemax,
    "entmax15": functional.entmax15,
    "entmax_bisect": functional.entmax_bisect,
}


def _map_rows():
    """Bad input shared by the four simplex maps."""
    rows = []
    for name, fn in MAPS.items():
        rows += [
            (f"{name}-list-scores", lambda fn=fn: fn([[0.0, 1.0]]), "scores must be a torch"),
            (f"{name}-int-scores", lambda fn=fn: fn(torch.ones(2, 3, dtype=torch.long)),
             "scores must be a floating"),
            (f"{name}-dim-str", lambda fn=fn: fn(X, dim="-1"), "dim must be an int"),
            (f"{name}-dim-range", lambda fn=fn: fn(X, dim=2), "dim=2 is out of range"),
            (f"{name}-0d", lambda fn=fn: fn(torch.tensor(1.0)), "dim=-1 is invalid"),
            (f"{name}-empty-keys", lambda fn=fn: fn(torch.zeros(3, 0)), "scores has an empty"),
            (f"{name}-nan", lambda fn=fn: fn(torch.tensor([0.0, float("nan")])),
             "scores contains NaN"),
            (f"{name}-inf", lambda fn=fn: fn(torch.tensor([0.0, float("-inf")])),
             "scores contains infinite"),
            (f"{name}-mask-list", lambda fn=fn: fn(X, mask=[True] * 4), "mask must be a torch"),
            (f"{name}-mask-float", lambda fn=fn: fn(X, mask=torch.ones(4)), "mask must be a bool"),
            (f"{name}-mask-shape", lambda fn=fn: fn(X, mask=torch.ones(5, dtype=torch.bool)),
             "mask of shape"),
            (f"{name}-mask-enlarges",
             lambda fn=fn: fn(X, mask=torch.ones(2, 3, 4, dtype=torch.bool)), "mask .*enlarge"),
            (f"{name}-mask-all-false",
             lambda fn=fn: fn(X, mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4])),
             "mask masks every key"),
        ]
    return rows


ROWS = _map_rows() + [
    # entmax_bisect's own arguments
    ("bisect-alpha-none", lambda: bisect(X, alpha=None), "alpha must be a real"),
    ("bisect-alpha-str", lambda: bisect(X, alpha="1.5"), "alpha must be a real"),
    ("bisect-alpha-bool", lambda: bisect(X, alpha=True), "alpha must be a real"),
    ("bisect-alpha-below-one", lambda: bisect(X, alpha=0.5), "alpha must be >= 1"),
    ("bisect-alpha-nan", lambda: bisect(X, alpha=float("nan")), "alpha must be"),
    ("bisect-alpha-inf", lambda: bisect(X, alpha=float("inf")), "alpha must be"),
    ("bisect-alpha-int-tensor",
     lambda: bisect(X, alpha=torch.ones(3, 1, dtype=torch.long)), "alpha must"),
    ("bisect-alpha-shape", lambda: bisect(X, alpha=torch.ones(4, 1)),
     "alpha of shape"),
    ("bisect-alpha-tensor-below-one",
     lambda: bisect(X, alpha=torch.full((3, 1), 0.9)), "alpha must be >= 1"),
    ("bisect-alpha-tensor-nan",
     lambda: bisect(X, alpha=torch.full((3, 1), float("nan"))), "alpha contains"),
    ("bisect-n-iter-zero", lambda: bisect(X, 1.3, n_iter=0), "n_iter must"),
    ("bisect-n-iter-float", lambda: bisect(X, 1.3, n_iter=2.5), "n_iter must"),
    ("bisect-n-iter-bool", lambda: bisect(X, 1.3, n_iter=True), "n_iter must"),
    ("bisect-tol-negative", lambda: bisect(X, 1.3, tol=-1e-3), "tol must be"),
    ("bisect-tol-str", lambda: bisect(X, 1.3, tol="small"), "tol must be"),
    # modules check their settings when built
    ("module-sparsemax-dim", lambda: Sparsemax(dim=1.0), "dim must be an int"),
    ("module-entmax15-dim", lambda: Entmax15(dim="last"), "dim must be an int"),
    ("module-bisect-alpha-str", lambda: EntmaxBisect(alpha="1.5"), "alpha must be a real"),
    ("module-bisect-alpha-low", lambda: EntmaxBisect(alpha=0.2), "alpha must be a finite"),
    ("module-bisect-alpha-int-tensor", lambda: EntmaxBisect(alpha=torch.tensor(2)),
     "alpha must be a float"),
    ("module-bisect-n-iter", lambda: EntmaxBisect(n_iter=0), "n_iter must"),
    ("module-bisect-tol", lambda: EntmaxBisect(tol=0.0), "tol must be positive"),
    # CategoricalAlignment
    ("categorical-neither", lambda: Categorical(), "exactly one of logits= or probs="),
    ("categorical-both", lambda: Categorical(logits=X, probs=X.softmax(-1)),
     "exactly one of logits= or probs="),
    ("categorical-logits-list", lambda: Categorical(logits=[[0.0, 1.0]]),
     "logits must be a torch"),
    ("categorical-logits-int", lambda: Categorical(logits=torch.ones(2, 3, dtype=torch.long)),
     "logits must be a floating"),
    ("categorical-logits-0d", lambda: Categorical(logits=torch.tensor(1.0)),
     "logits must have a key dimension"),
    ("categorical-logits-nan", lambda: Categorical(logits=torch.tensor([0.0, float("nan")])),
     "logits contains NaN"),
    ("categorical-probs-negative", lambda: Categorical(probs=torch.tensor([0.5, -0.5])),
     "probs must be non-negative"),
    ("categorical-probs-no-mass",
     lambda: Categorical(probs=torch.tensor([0.0, 1.0]), mask=torch.tensor([True, False])),
     "probs put no mass"),
    ("categorical-mask-float", lambda: Categorical(logits=X, mask=torch.ones(4)),
     "mask must be a bool"),
    ("categorical-mask-shape",
     lambda: Categorical(logits=X, mask=torch.ones(3, 5, dtype=torch.bool)), "mask of shape"),
    ("categorical-infer-shapes-neither", lambda: CategoricalAlignment.infer_shapes(mask=(3, 4)),
     "exactly one of logits or probs"),
    # SparsemaxAlignment
    ("sparse-neither", lambda: Sparse(), "exactly one of scores= or logits="),
    ("sparse-alpha-str", lambda: Sparse(scores=X, alpha="2"), "alpha must be a finite"),
    ("sparse-alpha-none", lambda: Sparse(scores=X, alpha=None), "alpha must be a finite"),
    ("sparse-alpha-one", lambda: Sparse(scores=X, alpha=1.0), "alpha must be a finite"),
    ("sparse-smoothing-one", lambda: Sparse(scores=X, smoothing=1.0), "smoothing must"),
    ("sparse-smoothing-str", lambda: Sparse(scores=X, smoothing="0.1"), "smoothing must"),
    ("sparse-scores-list", lambda: Sparse(scores=[[1.0, 2.0]]), "scores must be a torch"),
    ("sparse-infer-shapes-0d", lambda: SparsemaxAlignment.infer_shapes(scores=()),
     "scores must have a key dimension"),
    # RelaxedAlignment
    ("relaxed-temperature-shape", lambda: RelaxedAlignment(X, temperature=torch.ones(7)),
     "temperature of shape"),
    ("relaxed-temperature-enlarges", lambda: RelaxedAlignment(X, temperature=torch.ones(2, 3)),
     "temperature of shape .*enlarge"),
    ("relaxed-temperature-zero", lambda: RelaxedAlignment(X, temperature=0.0),
     "temperature must be positive"),
    ("relaxed-temperature-nan", lambda: RelaxedAlignment(X, temperature=float("nan")),
     "temperature must be positive"),
    ("relaxed-temperature-str", lambda: RelaxedAlignment(X, temperature="hot"),
     "temperature must be a positive number"),
    ("relaxed-temperature-int-tensor", lambda: RelaxedAlignment(X, temperature=torch.tensor(1)),
     "temperature must be a floating"),
    ("relaxed-logits-int", lambda: RelaxedAlignment(torch.ones(2, 3, dtype=torch.long)),
     "logits must be a floating"),
    ("relaxed-mask-all-false",
     lambda: RelaxedAlignment(X, mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4])),
     "mask masks every key"),
    ("relaxed-infer-shapes-0d", lambda: RelaxedAlignment.infer_shapes(logits=()),
     "logits must have a key dimension"),
    # data
    ("vocab-decode-float", lambda: Vocab(["a"]).decode([3.7]), r"ids\[0\] is 3.7"),
    ("vocab-decode-bool", lambda: Vocab(["a"]).decode([True]), r"ids\[0\] is the bool"),
    ("vocab-decode-range", lambda: Vocab(["a"]).decode([99]), "ids contains 99"),
    ("vocab-symbols-str", lambda: Vocab("abc"), "symbols must be an iterable"),
    ("vocab-build-min-count", lambda: Vocab.build([["a"]], min_count=0), "min_count must"),
    ("pad-empty-sequence", lambda: pad_sequences([[1], []], 0), r"sequences holds an empty"),
    ("bucket-batch-size", lambda: bucket_by_length([1, 2], 0, seed=0), "batch_size must"),
    ("batches-batch-size", lambda: Seq2SeqBatches([_Example(("a",), ("b",))], Vocab(["a"]),
                                                  Vocab(["b"]), batch_size=0), "batch_size must"),
    ("batches-empty-source", lambda: Seq2SeqBatches([_Example((), ("b",))], Vocab(["a"]),
                                                    Vocab(["b"]), batch_size=1),
     r"examples\[0\] has an empty source"),
    ("parallel-tokenize", lambda: load_parallel_text("s", "t", tokenize="bpe"), "tokenize must"),
    ("ztext-testament", lambda: read_ztext(".", "apocrypha"), "testament must"),
    ("copy-noise", lambda: aligned_copy_batch(2, 3, 5, noise=2.0), "noise must"),
    # readout
    ("gather-int-values-float-z",
     lambda: gather(torch.ones(2, 4, 3, dtype=torch.long), torch.rand(2, 5, 4)),
     "values must be floating"),
    ("gather-1d-values", lambda: gather(torch.ones(4), torch.zeros(2, dtype=torch.long)),
     "values must be"),
    # structured distributions' settings
    ("segmentation-scale-str",
     lambda: SegmentationAlignment(torch.randn(2, 3), scale="wide"), "scale must be a real"),
    ("segmentation-scale-nan",
     lambda: SegmentationAlignment(torch.randn(2, 3), scale=float("nan")), "scale must be"),
    ("segmentation-transition-int",
     lambda: SegmentationAlignment(torch.randn(2, 3), transition=torch.ones(2, 2, dtype=int)),
     "transition must be a \\(2, 2\\) floating"),
    ("tree-multiroot-str",
     lambda: NonProjectiveDependencyCRF(torch.randn(2, 3, 3), multiroot="no"),
     "multiroot must be True or False"),
    ("tree-multiroot-int",
     lambda: ProjectiveDependencyCRF(torch.randn(2, 3, 3), multiroot=1),
     "multiroot must be True or False"),
    # layers check their inputs' feature sizes and dtypes (torch's errors would not name them)
    ("latent-query-size",
     lambda: LatentAttention(4, 6)(torch.randn(2, 3, 5), torch.randn(2, 3, 6)), "query must be"),
    ("latent-keys-int",
     lambda: LatentAttention(4, 6)(torch.randn(2, 3, 4), torch.ones(2, 3, 6, dtype=torch.long)),
     "keys must be a floating"),
    ("latent-batch-mismatch",
     lambda: LatentAttention(4, 6)(torch.randn(2, 3, 4), torch.randn(3, 5, 6)),
     "broadcastable batch"),
    ("encoder-layer-size",
     lambda: TransformerEncoderLayer(8, 2, 16)(torch.randn(2, 5, 9)), "x must be"),
    ("encoder-layer-int",
     lambda: TransformerEncoderLayer(8, 2, 16)(torch.ones(2, 5, 8, dtype=torch.long)),
     "x must be a floating"),
    ("decoder-layer-memory-size",
     lambda: TransformerDecoderLayer(8, 2, 16)(torch.randn(2, 5, 8), torch.randn(2, 4, 7)),
     "memory must be"),
    ("layer-feedforward-zero", lambda: TransformerEncoderLayer(8, 2, 0), "dim_feedforward must"),
    ("site-name-not-str",
     lambda: sample_alignment(3, Categorical(logits=X)), "name must be a string"),
    ("site-dist-tensor", lambda: sample_alignment("z", X), "dist must be an alignment"),
    ("site-mask-shape",
     lambda: sample_alignment("z", Categorical(logits=torch.randn(2, 3, 4)),
                              mask=torch.ones(2, 4, dtype=torch.bool)), "mask of shape"),
    ("vocab-symbol-not-str", lambda: Vocab.build([["a", None]]), "symbols must be strings"),
    ("gather-along-index-range",
     lambda: gather_along(torch.randn(2, 3), torch.tensor([[5]])), "index must lie in"),
    ("hmm-null-nan",
     lambda: HMMAlignment(torch.randn(5), torch.randn(3, 4), null_probability=float("nan")),
     "null_probability must lie strictly between 0 and 1"),
]


class _Example:
    def __init__(self, source, target):
        self.source, self.target = source, target


@pytest.mark.parametrize("call, message", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_table_ids_are_unique():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids))


def test_bad_alpha_is_refused_even_with_validation_off():
    import pyro

    pyro.enable_validation(False)
    with pytest.raises(ValueError, match="alpha must be a real"):
        bisect(X, alpha="1.5")


def test_float16_relaxed_alignment_accepts_its_own_samples():
    for straight_through in (False, True):
        dist = RelaxedAlignment(
            torch.randn(5, 7).half() * 4, temperature=0.5,
            mask=torch.arange(7) < 5, straight_through=straight_through,
        )
        value = dist.rsample((3,))
        log_prob = dist.log_prob(value)
        assert log_prob.dtype == torch.float16 and log_prob.shape == (3, 5)
        assert torch.isfinite(log_prob).all()


def _seq2seq_batch(**changes):
    from structattn.data.batching import Seq2SeqBatch

    generator = torch.Generator().manual_seed(0)
    fields = dict(source=torch.randint(3, 10, (2, 4), generator=generator),
                  source_mask=torch.ones(2, 4, dtype=torch.bool),
                  target=torch.randint(3, 12, (2, 5), generator=generator),
                  target_mask=torch.ones(2, 5, dtype=torch.bool), indices=torch.arange(2))
    fields.update(changes)
    return Seq2SeqBatch(**fields)


BAD_BATCHES = {
    "source-id-too-large": (dict(source=torch.full((2, 4), 10)), "source holds token ids"),
    "source-id-negative": (dict(source=torch.full((2, 4), -1)), "source holds token ids"),
    "source-float": (dict(source=torch.ones(2, 4)), "source must hold integer"),
    "target-id-too-large": (dict(target=torch.full((2, 5), 12)), "target holds token ids"),
    "source-mask-shape": (dict(source_mask=torch.ones(2, 3, dtype=torch.bool)),
                          "source_mask must have the shape"),
    "source-mask-float": (dict(source_mask=torch.ones(2, 4)), "source_mask must be a bool"),
    "source-empty-row": (dict(source_mask=torch.tensor([[True] * 4, [False] * 4])),
                         "empty source sequence"),
    "target-only-bos": (dict(target=torch.ones(2, 1, dtype=torch.long),
                             target_mask=torch.ones(2, 1, dtype=torch.bool)), "T >= 2"),
    "target-mask-shape": (dict(target_mask=torch.ones(2, 4, dtype=torch.bool)),
                          "target_mask must have the shape"),
    "target-count": (dict(target=torch.randint(3, 12, (3, 5)),
                          target_mask=torch.ones(3, 5, dtype=torch.bool)), "same number"),
}


@pytest.mark.parametrize("model", ["rnn", "transformer"])
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_every_sequence_model_names_a_bad_batch(model, case):
    """One check of ids, masks and shapes serves every sequence model (the Transformer once
    passed bad ids to its embedding: an IndexError)."""
    from structattn.models import Seq2Seq, TransformerSeq2Seq

    built = Seq2Seq(10, 12) if model == "rnn" else TransformerSeq2Seq(10, 12)
    changes, message = BAD_BATCHES[case]
    with pytest.raises(ValueError, match=message):
        built.loss(_seq2seq_batch(**changes))
    if "source" in case:
        batch = _seq2seq_batch(**changes)
        with pytest.raises(ValueError, match=message):
            built.beam_search(batch.source, batch.source_mask, beam_size=2, max_length=3)
