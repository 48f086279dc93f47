"""Per-step cost of the word-alignment Pyro models against hand-written PyTorch, same run.

One step is what EM does per batch: the exact ``log p(y | x)`` and its gradient with respect to
the emission table (the expected link counts). Compared, on one batch of synthetic sentence
pairs shaped like the Bible verses (lengths 15-40, vocabularies of 5,000 words):

* IBM Model 1: the Pyro model (``TraceEnum_ELBO``, ``observe_alignment_emission``) against a
  hand-written ``logsumexp``; also the naive Pyro emission
  ``pyro.sample("y", Categorical(logits=log_t[gather(source, z)]), obs=y)`` (gradient to
  ``log_t``) to show what the helper saves;
* the HMM aligner: the Pyro model (``pyro.markov``, ``gather_along``) against
  ``HMMAlignment.log_partition`` and against a plain forward recursion written in a loop.

Ratios (Pyro / hand-written) come from the same run, so they survive a busy machine better
than the absolute times.

    python benchmarks/word_alignment.py
    python benchmarks/word_alignment.py --pairs 64 --length 30 --repeats 5
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch

import structattn as sa
from structattn.models.word_alignment import (
    AlignmentBatch,
    hmm_log_likelihood,
    hmm_model,
    ibm1_log_likelihood,
    ibm1_model,
    pyro_log_likelihood,
)


def synthetic_batch(pairs: int, length: int, vocabulary: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(2, vocabulary, (pairs, length), generator=generator)
    target = torch.randint(1, vocabulary, (pairs, length), generator=generator)
    source_lengths = torch.randint(length // 2, length + 1, (pairs,), generator=generator)
    target_lengths = torch.randint(length // 2, length + 1, (pairs,), generator=generator)
    source_lengths[0] = target_lengths[0] = length
    batch = AlignmentBatch(source, target, source_lengths, target_lengths, list(range(pairs)))
    log_t = torch.log_softmax(torch.randn(vocabulary, vocabulary, generator=generator), -1)
    return batch, log_t


def table_of(log_t, batch):
    source = torch.cat([batch.source, torch.ones_like(batch.source[:, :1])], 1)
    return log_t[source.unsqueeze(1), batch.target.unsqueeze(2)].requires_grad_(True)


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_ibm1_model(batch, log_t):
    """The pattern the emission helper replaces: logits over the vocabulary per alignment."""
    num_pairs, num_targets = batch.target.shape
    source = torch.cat([batch.source, torch.ones_like(batch.source[:, :1])], 1)
    valid = torch.cat([batch.source_mask, torch.ones_like(batch.source_mask[:, :1])], 1)
    prior = sa.CategoricalAlignment(logits=torch.zeros(num_pairs, 1, source.shape[1]),
                                    mask=valid.unsqueeze(1))
    with pyro.plate("pairs", num_pairs, dim=-2), pyro.plate("targets", num_targets, dim=-1):
        z = sa.infer.sample_alignment("z", prior, estimator="enum", mask=batch.target_mask)
        words = sa.infer.gather(source.unsqueeze(-1), z).squeeze(-1)
        with pyro.poutine.mask(mask=batch.target_mask):
            pyro.sample("y", dist.Categorical(logits=log_t[words]), obs=batch.target)


def plain_forward(batch, table, jump_scores, null_probability):
    """The HMM's forward recursion written directly (log space, a loop over target words)."""
    num_sources = batch.source.shape[1]
    start, moves, _ = sa.distributions.hmm.hmm_log_transitions(
        jump_scores.expand(batch.source.shape[0], -1), batch.source_lengths, num_sources,
        null_probability, -1e4,
    )
    emissions = sa.distributions.hmm.state_emissions(table, num_sources)
    alpha = start + emissions[:, 0]
    mask = batch.target_mask
    for t in range(1, table.shape[1]):
        step = torch.logsumexp(moves + alpha.unsqueeze(-2), -1) + emissions[:, t]
        alpha = torch.where(mask[:, t, None], step, alpha)
    return torch.logsumexp(alpha, -1)


def main(args):
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    batch, log_t = synthetic_batch(args.pairs, args.length, args.vocabulary, args.seed)
    jump_scores = torch.randn(15)
    rows = []

    def gradient_step(log_likelihood):
        def step():
            table = table_of(log_t, batch)
            torch.autograd.grad(log_likelihood(table), [table])
        return step

    hand = timed(gradient_step(lambda table: ibm1_log_likelihood(batch, table).sum()),
                 args.repeats)
    pyro_time = timed(gradient_step(
        lambda table: pyro_log_likelihood(ibm1_model, 2, batch, table)), args.repeats)
    leaf = log_t.clone().requires_grad_(True)

    def naive_step():
        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
            naive_ibm1_model, lambda *a: None, batch, leaf)
        torch.autograd.grad(loss, [leaf])

    naive = timed(naive_step, args.repeats)
    rows += [("IBM1 hand-written logsumexp", hand, 1.0),
             ("IBM1 Pyro + observe_alignment_emission", pyro_time, pyro_time / hand),
             ("IBM1 Pyro, naive Categorical emission", naive, naive / hand)]

    null = args.null_probability
    hand = timed(gradient_step(
        lambda table: hmm_log_likelihood(batch, table, jump_scores, null).sum()), args.repeats)
    plain = timed(gradient_step(
        lambda table: plain_forward(batch, table, jump_scores, null).sum()), args.repeats)
    pyro_time = timed(gradient_step(lambda table: pyro_log_likelihood(
        hmm_model, 1, batch, table, jump_scores, null)), args.repeats)
    rows += [("HMM HMMAlignment.log_partition", hand, 1.0),
             ("HMM plain forward loop + autograd", plain, plain / hand),
             ("HMM Pyro (pyro.markov + gather_along)", pyro_time, pyro_time / hand),
             ("HMM Pyro / plain forward loop", pyro_time, pyro_time / plain)]
    print(f"pairs {args.pairs}, length <= {args.length}, vocabulary {args.vocabulary}, "
          f"median of {args.repeats}, 1 thread")
    print(f"{'step (log p(y|x) + gradient)':42s} {'ms':>9s} {'ratio':>7s}")
    for name, seconds, ratio in rows:
        print(f"{name:42s} {1000 * seconds:9.1f} {ratio:7.2f}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32, help="sentence pairs in the batch")
    parser.add_argument("--length", type=int, default=30, help="longest sentence (both sides)")
    parser.add_argument("--vocabulary", type=int, default=5000, help="words per side")
    parser.add_argument("--null-probability", type=float, default=0.2, help="HMM NULL p0")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
