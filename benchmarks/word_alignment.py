"""Per-step cost of the word-alignment Pyro models against hand-written PyTorch, same run.

One step is what EM does per batch: the emission table read from the translation table, the
exact ``log p(y | x)``, its gradient with respect to the emission table (the posterior of every
link) and the expected counts added into a translation-table-sized buffer. Compared, on one
batch of synthetic sentence pairs shaped like the Bible verses (vocabularies of 5,000 words):

* IBM Model 1: the Pyro model (``TraceEnum_ELBO``, ``observe_alignment_emission``) against a
  hand-written ``logsumexp``; also the naive Pyro emission
  ``pyro.sample("y", Categorical(logits=log_t[gather(source, z)]), obs=y)`` (gradient to
  ``log_t``) to show what the helper saves;
* the HMM aligner (the trainer's batch by default: ``--max-cells`` as in the example): the
  Pyro model as the aligner trains it (the chain summed out by ``HMMAlignment`` inside the
  model, ``Trace_ELBO``) against the reference, :func:`hand_written_forward`: the scaled
  forward algorithm written directly for this one model in float32 (see its docstring). Also
  shown: ``HMMAlignment.log_partition`` alone, a log-space forward loop, and the chain written
  out in Pyro with one enumerated site per word (``pyro.markov``, ``TraceEnum_ELBO``). The HMM
  rows are checked to compute the same ``log p(y | x)`` before timing.

Ratios (to hand-written) come from the same run, interleaved, as wall-clock and as CPU time
(steadier on a shared machine).

    python benchmarks/word_alignment.py --skip-naive
    python benchmarks/word_alignment.py --pairs 32 --length 30 --repeats 21
"""

import argparse
import math
import statistics
import time

import pyro
import pyro.distributions as dist
import torch

import structattn as sa
from structattn.models.word_alignment import (
    AlignmentBatch,
    hmm_log_likelihood,
    hmm_markov_model,
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


def timed_interleaved(steps: dict, repeats: int) -> dict:
    """Median (wall, CPU) seconds of each step; the steps take turns, so load changes hit them
    alike. CPU time (this thread's) is the steadier of the two on a shared machine."""
    for step in steps.values():
        step()  # warm-up
    times = {name: ([], []) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            step()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.thread_time() - cpu)
    return {name: (statistics.median(wall), statistics.median(cpu))
            for name, (wall, cpu) in times.items()}


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


def hand_written_forward(batch, table, jump_scores, null_probability):
    """The reference: the HMM aligner's forward algorithm as one would write it for this model.

    Float32, probability space: one ``(S, S)`` move matrix per sentence, built once; the
    emissions shifted by their maximum per step; the forward vector (a row, so each step is a
    vector-matrix ``bmm``) renormalized every step and the logs of the scales summed; NULL
    states folded into one product with the previous distribution; per-step slices taken once
    (``unbind``); the backward pass (the posteriors) by autograd. No generality (one model,
    one batch layout) and no check for underflow: what ``HMMAlignment`` adds is measured
    against it.
    """
    num_pairs, num_sources = batch.source.shape
    positions = torch.arange(num_sources)
    in_source = positions < batch.source_lengths.unsqueeze(-1)
    max_jump = jump_scores.shape[-1] // 2
    jumps = (positions.unsqueeze(0) - positions.unsqueeze(-1)).clamp(-max_jump, max_jump)
    scores = jump_scores[jumps + max_jump].expand(num_pairs, -1, -1)  # [pair, previous, next]
    moves = torch.softmax(scores.masked_fill(~in_source.unsqueeze(-2), -math.inf), -1)
    moves = moves * (1 - null_probability)
    first = jump_scores[(positions + 1).clamp_max(max_jump) + max_jump]
    start = torch.softmax(first.masked_fill(~in_source, -math.inf), -1)
    valid = torch.cat([in_source, torch.ones_like(in_source[:, :1])], -1)
    steps = batch.target_mask
    emissions = table.masked_fill(~valid.unsqueeze(1), -math.inf)
    emissions = emissions.masked_fill(~steps.unsqueeze(-1), 0.0)
    shift = emissions.amax(-1, keepdim=True)
    weights = (emissions - shift).exp().unsqueeze(-2)
    real = weights[..., :num_sources].unbind(1)
    null = (weights[..., num_sources:] * null_probability).unbind(1)
    alpha = start.unsqueeze(-2) * ((1 - null_probability) * real[0] + null[0])
    scales = [alpha.sum(-1)]
    alpha = alpha / scales[0].unsqueeze(-1)
    for t in range(1, table.shape[1]):
        alpha = torch.bmm(alpha, moves) * real[t] + alpha * null[t]
        scales.append(alpha.sum(-1))
        alpha = alpha / scales[-1].unsqueeze(-1)
    log_scales = torch.cat(scales, -1).log() + shift.squeeze(-1)
    return (log_scales * steps).sum(-1)


def log_space_forward(batch, table, jump_scores, null_probability):
    """The HMM's forward recursion in log space (``logsumexp`` over ``(batch, C, C)``)."""
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
    pyro.enable_validation(False)  # as in training; validation re-checks every site's value
    if args.pairs is None:  # the trainer's batch: max_cells T * S^2 cells
        args.pairs = max(1, args.max_cells // args.length**3)
    batch, log_t = synthetic_batch(args.pairs, args.length, args.vocabulary, args.seed)
    ibm1_batch, _ = synthetic_batch(args.ibm1_pairs, args.length, args.vocabulary, args.seed)
    jump_scores = torch.randn(15)
    null = args.null_probability
    counts = torch.zeros_like(log_t)

    def em_step(log_likelihood, batch=batch):
        """One EM step as the trainer runs it: table, log p(y|x), its gradient, the counts."""
        source = torch.cat([batch.source, torch.ones_like(batch.source[:, :1])], 1)

        def step():
            table = table_of(log_t, batch)
            (posterior,) = torch.autograd.grad(log_likelihood(table), [table])
            rows = source.unsqueeze(1).expand(posterior.shape)
            columns = batch.target.unsqueeze(2).expand(posterior.shape)
            counts.index_put_((rows.reshape(-1), columns.reshape(-1)), posterior.reshape(-1),
                              accumulate=True)
        return step

    leaf = log_t.clone().requires_grad_(True)

    def naive_step():
        """The naive emission: the counts come from the gradient with respect to log t."""
        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
            naive_ibm1_model, lambda *a: None, batch, leaf)
        (grad,) = torch.autograd.grad(loss, [leaf])
        counts.sub_(grad)

    steps = {
        "IBM1 hand-written logsumexp": em_step(
            lambda table: ibm1_log_likelihood(ibm1_batch, table).sum(), ibm1_batch),
        "IBM1 Pyro + observe_alignment_emission": em_step(
            lambda table: pyro_log_likelihood(ibm1_model, 2, ibm1_batch, table), ibm1_batch),
        "IBM1-small hand-written logsumexp": em_step(
            lambda table: ibm1_log_likelihood(batch, table).sum()),
        "IBM1-small Pyro + observe_alignment_emission": em_step(
            lambda table: pyro_log_likelihood(ibm1_model, 2, batch, table)),
        "IBM1-small Pyro, naive Categorical emission": naive_step,
        "HMM hand-written scaled forward": em_step(
            lambda table: hand_written_forward(batch, table, jump_scores, null).sum()),
        "HMM HMMAlignment.log_partition": em_step(
            lambda table: hmm_log_likelihood(batch, table, jump_scores, null).sum()),
        "HMM Pyro, chain summed by HMMAlignment": em_step(lambda table: pyro_log_likelihood(
            hmm_model, 1, batch, table, jump_scores, null, elbo_class=pyro.infer.Trace_ELBO)),
        "HMM log-space forward loop": em_step(
            lambda table: log_space_forward(batch, table, jump_scores, null).sum()),
        "HMM Pyro, pyro.markov + gather_along": em_step(lambda table: pyro_log_likelihood(
            hmm_markov_model, 1, batch, table, jump_scores, null)),
    }
    if args.skip_naive:
        del steps["IBM1-small Pyro, naive Categorical emission"]
    check_same_likelihood(batch, log_t, jump_scores, null)
    seconds = timed_interleaved(steps, args.repeats)
    references = {"IBM1": seconds["IBM1 hand-written logsumexp"],
                  "IBM1-small": seconds["IBM1-small hand-written logsumexp"],
                  "HMM": seconds["HMM hand-written scaled forward"]}
    print(f"HMM and IBM1-small batch {args.pairs} pairs, IBM1 batch {args.ibm1_pairs} pairs "
          f"(the trainer's IBM1 batches are S times larger than the HMM's), length <= "
          f"{args.length}, vocabulary {args.vocabulary}, median of {args.repeats} interleaved "
          "rounds, 1 thread")
    print(f"{'one EM step (log p(y|x), gradient, counts)':46s} {'wall ms':>8s} {'ratio':>6s} "
          f"{'CPU ms':>8s} {'ratio':>6s}")
    rows = []
    for name, (wall, cpu) in seconds.items():
        reference_wall, reference_cpu = references[name.split()[0]]
        rows.append((name, wall, wall / reference_wall, cpu, cpu / reference_cpu))
        print(f"{name:46s} {1000 * wall:8.1f} {wall / reference_wall:6.2f} "
              f"{1000 * cpu:8.1f} {cpu / reference_cpu:6.2f}")
    print("ratios: to the hand-written step of the same model in this run (IBM1: logsumexp; "
          "HMM: scaled forward, float32, probability space, autograd backward)")
    return rows


def check_same_likelihood(batch, log_t, jump_scores, null):
    """The HMM rows compute the same ``log p(y | x)``: the reference is not a different job."""
    table = table_of(log_t, batch).detach()
    values = [hand_written_forward(batch, table, jump_scores, null).sum(),
              hmm_log_likelihood(batch, table, jump_scores, null).sum(),
              pyro_log_likelihood(hmm_model, 1, batch, table, jump_scores, null,
                                  elbo_class=pyro.infer.Trace_ELBO),
              log_space_forward(batch, table, jump_scores, null).sum()]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=1e-4, atol=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=None,
                        help="sentence pairs in the HMM's batch (default: the trainer's batch, "
                             "--max-cells // length^3)")
    parser.add_argument("--max-cells", type=int, default=4_000_000,
                        help="the trainer's batch budget in T * S^2 cells (the example's)")
    parser.add_argument("--ibm1-pairs", type=int, default=1024,
                        help="sentence pairs in IBM1's batch")
    parser.add_argument("--length", type=int, default=30, help="longest sentence (both sides)")
    parser.add_argument("--vocabulary", type=int, default=5000, help="words per side")
    parser.add_argument("--null-probability", type=float, default=0.2, help="HMM NULL p0")
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions (median)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--skip-naive", action="store_true",
                        help="leave out the naive emission (slow at large batches)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
