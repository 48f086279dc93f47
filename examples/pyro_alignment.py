"""Latent alignments in Pyro: one model, four ways to train it, two ways to read it.

The model is structattn's toy aligned-copy encoder-decoder (``structattn.models.toy``): every
target token ``y_t`` is emitted from one source position ``z_t``.  It is trained with

* ``model-enum``: ``TraceEnum_ELBO`` enumerating ``z`` in the model (exact marginal
  likelihood, no guide);
* ``guide-enum``: ``TraceEnum_ELBO`` enumerating ``z`` in an inference network ``q(z | x, y)``
  (the exact ELBO);
* ``trace``: ``Trace_ELBO`` with a sampled ``z`` (score function);
* ``tracegraph``: ``TraceGraph_ELBO`` with a decaying-average baseline,

and afterwards the hard alignment is recovered with ``infer_discrete`` (posterior MAP) and the
posterior marginals with ``TraceEnum_ELBO.compute_marginals``.

    python examples/pyro_alignment.py --steps 300
    python examples/pyro_alignment.py --smoke-test
"""

import argparse
import logging
import os

import pyro
import torch
from pyro.infer import (
    SVI,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    config_enumerate,
    infer_discrete,
)
from pyro.optim import Adam
from torch import nn

import structattn as sa
from structattn.data.copy import aligned_copy_batch
from structattn.models.toy import AlignedCopyModel

logging.basicConfig(format="[%(relativeCreated)7.0f ms] %(message)s", level=logging.INFO)

MODES = ("model-enum", "guide-enum", "trace", "tracegraph")


class AlignmentGuide(nn.Module):
    """q(z | x, y): bi-GRU states of source and target, bilinear scores between them."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab_size, hidden)
        self.tgt_embed = nn.Embedding(vocab_size, hidden)
        self.src_rnn = nn.GRU(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.tgt_rnn = nn.GRU(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.attention = sa.nn.LatentAttention(hidden, hidden, score="bilinear")

    def forward(self, batch):
        src, _ = self.src_rnn(self.src_embed(batch.src))
        tgt, _ = self.tgt_rnn(self.tgt_embed(batch.tgt))
        return self.attention(tgt, src, batch.src_mask)


def make_guide(net: AlignmentGuide, estimator: str, baseline: dict | None = None):
    def guide(batch, estimator_in_model=None):
        pyro.module("guide", net)
        q = net(batch)
        batch_size, length = batch.tgt.shape
        with pyro.plate("batch", batch_size, dim=-2), pyro.plate("target", length, dim=-1):
            sa.infer.sample_alignment("z", q, estimator=estimator, mask=batch.tgt_mask,
                                      baseline=baseline)

    return guide


def build(mode: str, model: AlignedCopyModel, args):
    """Return (model function, guide function, ELBO) for one training mode."""
    if mode == "model-enum":
        empty_guide = lambda batch, estimator: None  # noqa: E731
        return model.pyro_model, empty_guide, TraceEnum_ELBO(max_plate_nesting=2)
    net = AlignmentGuide(args.vocab, args.hidden)
    if mode == "guide-enum":
        return model.pyro_model, make_guide(net, "enum"), TraceEnum_ELBO(max_plate_nesting=2)
    if mode == "trace":
        return model.pyro_model, make_guide(net, "score"), Trace_ELBO(max_plate_nesting=2)
    baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
    return (model.pyro_model, make_guide(net, "score", baseline),
            TraceGraph_ELBO(max_plate_nesting=2))


def evaluate(model: AlignedCopyModel, batch) -> dict:
    """Exact NLL/token, and alignment accuracy of the posterior MAP and of the marginals."""
    tokens = batch.tgt_mask.sum().item()
    with torch.no_grad():
        nll = -model.marginal_log_likelihood(batch).item() / tokens
        decoded = infer_discrete(config_enumerate(model.pyro_model), first_available_dim=-3,
                                 temperature=0)
        trace = pyro.poutine.trace(decoded).get_trace(batch, None)
        map_alignment = trace.nodes["z"]["value"]
        marginals = TraceEnum_ELBO(max_plate_nesting=2).compute_marginals(
            model.pyro_model, lambda batch, estimator: None, batch, "enum"
        )
        marginal_argmax = marginals["z"].attention.argmax(-1)

    def accuracy(z):
        return ((z == batch.alignment) & batch.tgt_mask).sum().item() / tokens

    return {"nll": nll, "acc_map": accuracy(map_alignment),
            "acc_marginals": accuracy(marginal_argmax)}


def main(args):
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(1)
    held_out = aligned_copy_batch(128, args.length, args.vocab, min_length=args.length // 2,
                                  generator=torch.Generator().manual_seed(args.seed + 1))
    for mode in args.modes:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        model = AlignedCopyModel(args.vocab, args.hidden)
        model_fn, guide_fn, elbo = build(mode, model, args)
        svi = SVI(model_fn, guide_fn, Adam({"lr": args.lr}), elbo)
        data = torch.Generator().manual_seed(args.seed)
        estimator = "enum" if mode == "model-enum" else None
        for step in range(args.steps):
            batch = aligned_copy_batch(args.batch_size, args.length, args.vocab,
                                       min_length=args.length // 2, generator=data)
            loss = svi.step(batch, estimator) / batch.tgt_mask.sum().item()
            if step % args.progress_every == 0 or step == args.steps - 1:
                logging.info(f"{mode:11s} step {step:4d}  loss/token {loss:.3f}")
        result = evaluate(model, held_out)
        logging.info(f"{mode:11s} held-out NLL/token {result['nll']:.3f}  "
                     f"MAP alignment acc {result['acc_map']:.3f}  "
                     f"marginals argmax acc {result['acc_marginals']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Latent alignments trained with Pyro's ELBOs")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated training modes from {', '.join(MODES)}")
    parser.add_argument("-n", "--steps", type=int, default=300, help="SVI steps per mode")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--length", type=int, default=20, help="maximum sequence length")
    parser.add_argument("--vocab", type=int, default=50, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (even)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--progress-every", type=int, default=50, help="log every N steps")
    parser.add_argument("--smoke-test", action="store_true", default="CI" in os.environ,
                        help="a few steps of each mode (default on when CI is set)")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(args.modes) - set(MODES))}")
    if args.smoke_test:
        args.steps, args.length, args.progress_every = 3, 8, 1
    main(args)
