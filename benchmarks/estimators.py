"""Gradient variance, bias and cost of every alignment estimator on the aligned-copy task.

Setup (the Pyro notes, section 5.3): the toy model of ``structattn.models.toy`` (bi-GRU
encoder, GRU decoder without input feeding, bilinear latent attention) with an
``InferenceNetwork`` guide (bi-GRU over the target, bilinear scores over a bi-GRU source
encoding) is trained for ``--pretrain-steps`` exact-ELBO steps; then, at fixed parameters and
on one fixed batch, each estimator's guide gradient is drawn ``--draws`` times and compared
with the exact gradient (total variance / ||g*||^2, relative bias with its Monte Carlo noise
floor).  A second model with a sparsemax prior is trained with the ``sparse`` estimator and
its emission evaluations per query are counted.  Finally the per-step time (forward, backward,
Adam) of exact guide-side enumeration is measured, round-robin in one loop: a hand-written
PyTorch exact ELBO, our plain-torch ``ExactEstimator``, our Pyro ``ExactELBO`` and Pyro's
``TraceEnum_ELBO``.

    python benchmarks/estimators.py            # full run (a few minutes on one core)
    python benchmarks/estimators.py --quick    # small numbers of steps and draws
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from structattn.data.copy import aligned_copy_batch
from structattn.distributions.categorical import mask_value
from structattn.infer import (
    RLOO_ELBO,
    AlignmentTerms,
    ExactELBO,
    ExactEstimator,
    ScoreFunctionEstimator,
    SparseEstimator,
    StraightThroughEstimator,
    gather,
    gradient_variance,
    sample_alignment,
)
from structattn.infer.diagnostics import flat_gradient
from structattn.models.toy import AlignedCopyModel
from structattn.nn.inference import InferenceNetwork


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size B (default 32)")
    parser.add_argument("--length", type=int, default=20,
                        help="maximum source/target length S = T (default 20)")
    parser.add_argument("--min-length", type=int, default=10,
                        help="shortest sequence; shorter ones are padded (default 10)")
    parser.add_argument("--vocab", type=int, default=50, help="vocabulary size V (default 50)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size H (default 64)")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="exact-ELBO training steps before measuring (default 150)")
    parser.add_argument("--draws", type=int, default=100,
                        help="gradient draws per estimator (default 100)")
    parser.add_argument("--baseline-steps", type=int, default=300,
                        help="training steps of the learned baseline, and batches that warm the "
                        "running mean (default 300)")
    parser.add_argument("--sparse-steps", type=int, default=300,
                        help="training steps of the sparsemax model (default 300)")
    parser.add_argument("--timing-steps", type=int, default=40,
                        help="timed steps per exact-ELBO implementation (default 40)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--validate-timing", action="store_true",
                        help="keep Pyro/torch distribution validation on while timing (off by "
                        "default: the hand-written reference validates nothing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--quick", action="store_true",
                        help="few steps and draws: a smoke test, numbers not meaningful")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.draws, args.baseline_steps = 20, 10, 20
        args.sparse_steps, args.timing_steps = 20, 5
    return args


class Toy:
    """The benchmark's model, guide and data, and the adapters the estimators need."""

    def __init__(self, args: argparse.Namespace, normalizer: str = "softmax") -> None:
        self.args = args
        self.model = AlignedCopyModel(args.vocab, args.hidden, normalizer=normalizer)
        self.guide_net = InferenceNetwork(args.hidden, args.hidden, args.hidden,
                                          target_vocab=args.vocab, source_vocab=args.vocab)
        self.generator = torch.Generator().manual_seed(args.seed + 1)

    def batch(self):
        a = self.args
        return aligned_copy_batch(a.batch_size, a.length, a.vocab, min_length=a.min_length,
                                  generator=self.generator)

    def guide(self, batch):
        return self.guide_net(batch.tgt, batch.src, batch.src_mask, batch.tgt_mask)

    def terms(self, batch, table: bool = False, soft: bool = False, features: bool = False):
        prior, enc, states = self.model(batch)

        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            logits = self.model.emission_logits(states, gather(enc, z))
            target = batch.tgt.expand(logits.shape[:-1]).unsqueeze(-1)
            return logits.log_softmax(-1).gather(-1, target).squeeze(-1)

        soft_ll = feats = None
        if soft:
            q = self.guide(batch)
            soft_ll = log_likelihood(q.attention.unsqueeze(0)).squeeze(0)
        if features:
            feats = self.guide_net.encode(batch.tgt, batch.src, batch.src_mask,
                                          batch.tgt_mask)[0]
        ll = self.model.emission_log_prob(batch, enc, states) if table else log_likelihood
        return AlignmentTerms(prior, ll, batch.tgt_mask, soft_ll, feats)

    def pyro_model(self, batch, estimator: str, register: bool = True) -> None:
        """The model side of a guided Pyro program (the guide's ``estimator`` is ignored)."""
        self.model.pyro_model(batch, None, register=register)

    def pyro_guide(self, batch, estimator: str, register: bool = True) -> None:
        if register:
            pyro.module("guide", self.guide_net)
        q = self.guide(batch)
        with pyro.plate("batch", batch.tgt.shape[0], dim=-2), \
                pyro.plate("target", batch.tgt.shape[1], dim=-1):
            sample_alignment("z", q, estimator=estimator, mask=batch.tgt_mask)

    def hand_exact_elbo_loss(self, batch) -> torch.Tensor:
        """The reference: exact ELBO written directly in PyTorch (no distributions)."""
        model, net = self.model, self.guide_net
        enc = model.encode(batch)
        states = model.decode(batch)
        key_mask = batch.src_mask.unsqueeze(1)
        fill = mask_value(enc.dtype)
        prior_scores = model.attention.scorer(states, enc).masked_fill(~key_mask, fill)
        log_p = prior_scores.log_softmax(-1)
        target_states, source_states = net.encode(batch.tgt, batch.src, batch.src_mask,
                                                  batch.tgt_mask)
        log_q = net.scores(target_states, source_states).masked_fill(~key_mask, fill)
        log_q = log_q.log_softmax(-1)
        emission = model.emission_log_prob(batch, enc, states)
        elbo = (log_q.exp() * (emission + log_p - log_q)).sum(-1)
        return -elbo.masked_fill(~batch.tgt_mask, 0.0).sum()


def pretrain(toy: Toy, steps: int, lr: float) -> None:
    params = list(toy.model.parameters()) + list(toy.guide_net.parameters())
    optim = torch.optim.Adam(params, lr=lr)
    estimator = ExactEstimator()
    for _ in range(steps):
        batch = toy.batch()
        optim.zero_grad()
        estimator.loss(toy.terms(batch, table=True), toy.guide(batch)).backward()
        optim.step()


def train_learned_baseline(toy: Toy, estimator: ScoreFunctionEstimator, steps: int, lr: float):
    """Fit the learned baseline alone (model and guide frozen), as the Pyro notes did."""
    optim = torch.optim.Adam(estimator.baseline.parameters(), lr=lr)
    for _ in range(steps):
        batch = toy.batch()
        optim.zero_grad()
        estimator.loss(toy.terms(batch, features=True), toy.guide(batch)).backward()
        optim.step()
    estimator.baseline.eval()


def warm_running_mean(toy: Toy, estimator: ScoreFunctionEstimator, steps: int) -> None:
    for _ in range(steps):
        batch = toy.batch()
        with torch.no_grad():
            estimator.loss(toy.terms(batch), toy.guide(batch))
    estimator.baseline.eval()


def variance_rows(toy: Toy, args: argparse.Namespace) -> list[tuple[str, object, str]]:
    batch = toy.batch()
    guide_params = list(toy.guide_net.parameters())
    exact = ExactEstimator()

    def exact_loss():
        return exact.loss(toy.terms(batch, table=True), toy.guide(batch))

    exact_grad = flat_gradient(exact_loss(), guide_params)

    def measure(estimator, **terms_kwargs):
        return gradient_variance(
            lambda: estimator.loss(toy.terms(batch, **terms_kwargs), toy.guide(batch)),
            exact_grad, guide_params, args.draws,
        )

    def measure_pyro(elbo, estimator_name):
        return gradient_variance(
            lambda: elbo.differentiable_loss(toy.pyro_model, toy.pyro_guide, batch,
                                             estimator_name),
            exact_grad, guide_params, args.draws,
        )

    rows = []
    rows.append(("score, no baseline (analytic KL)",
                 measure(ScoreFunctionEstimator("none")), "unbiased"))
    rows.append(("score, no baseline (sampled KL, as Pyro)",
                 measure(ScoreFunctionEstimator("none", kl="sampled")), "unbiased"))
    rows.append(("Pyro Trace_ELBO, no baseline (reference)",
                 measure_pyro(Trace_ELBO(max_plate_nesting=2), "score"), "unbiased"))
    mean = ScoreFunctionEstimator("mean")
    warm_running_mean(toy, mean, args.baseline_steps)
    rows.append(("score, running mean (warmed, frozen)", measure(mean), "unbiased"))
    learned = ScoreFunctionEstimator("learned", in_features=args.hidden)
    train_learned_baseline(toy, learned, args.baseline_steps, 1e-2)
    rows.append(("score, learned baseline (trained)", measure(learned, features=True),
                 "unbiased"))
    rows.append(("score, soft-attention baseline", measure(ScoreFunctionEstimator("soft"),
                                                          soft=True), "unbiased"))
    for k in (2, 4, 8):
        rows.append((f"RLOO K={k}", measure(ScoreFunctionEstimator("loo", num_samples=k)),
                     "unbiased"))
    rows.append(("RLOO_ELBO K=4 (Pyro)",
                 measure_pyro(RLOO_ELBO(4, max_plate_nesting=2), "rloo"), "unbiased"))
    for temperature in (1.0, 0.5):
        rows.append((f"ST Gumbel T={temperature} + exact KL",
                     measure(StraightThroughEstimator(temperature)), "BIASED"))
    rows.append(("exact (enum)", measure(exact, table=True), "exact"))
    return rows


def sparse_row(args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    toy = Toy(args, normalizer="sparsemax")
    optim = torch.optim.Adam(toy.model.parameters(), lr=args.lr)
    estimator = SparseEstimator()
    for _ in range(args.sparse_steps):
        batch = toy.batch()
        optim.zero_grad()
        estimator.loss(toy.terms(batch), None).backward()
        optim.step()
    batch = toy.batch()
    params = list(toy.model.parameters())
    sparse_grad = flat_gradient(estimator.loss(toy.terms(batch), None), params)
    stats = {name: float(value) for name, value in estimator.stats.items()}
    full = ExactEstimator()
    full_grad = flat_gradient(full.loss(toy.terms(batch, table=True), None), params)
    stats["relative_gradient_error"] = float((sparse_grad - full_grad).norm() / full_grad.norm())
    stats["objective_gap"] = abs(stats["objective"] - float(full.stats["objective"]))
    stats["nats_per_token"] = -stats["objective"] / float(batch.tgt_mask.sum())
    return "sparse (sparsemax prior, marginal likelihood)", stats


def timing_rows(toy: Toy, args: argparse.Namespace) -> dict[str, float]:
    batch = toy.batch()
    params = list(toy.model.parameters()) + list(toy.guide_net.parameters())
    optim = torch.optim.Adam(params, lr=1e-5)
    ours = ExactEstimator()
    ours_pyro = ExactELBO(max_plate_nesting=2)
    pyro_enum = TraceEnum_ELBO(max_plate_nesting=2)

    variants = {
        "hand-written PyTorch exact ELBO": lambda: toy.hand_exact_elbo_loss(batch),
        "structattn ExactEstimator (plain torch)":
            lambda: ours.loss(toy.terms(batch, table=True), toy.guide(batch)),
        "structattn ExactELBO (Pyro traces)":
            lambda: ours_pyro.differentiable_loss(toy.pyro_model, toy.pyro_guide, batch,
                                                  "enum"),
        "Pyro TraceEnum_ELBO": lambda: pyro_enum.differentiable_loss(toy.pyro_model, toy.pyro_guide,
                                                                     batch, "enum"),
        # the torch-native style: a torch optimizer on differentiable_loss needs no param store
        "structattn ExactELBO, no pyro.module":
            lambda: ours_pyro.differentiable_loss(toy.pyro_model, toy.pyro_guide, batch,
                                                  "enum", False),
        "Pyro TraceEnum_ELBO, no pyro.module":
            lambda: pyro_enum.differentiable_loss(toy.pyro_model, toy.pyro_guide, batch,
                                                  "enum", False),
    }
    values = {name: float(fn().detach()) for name, fn in variants.items()}
    spread = max(values.values()) - min(values.values())
    if spread > 1e-3 * abs(next(iter(values.values()))):
        raise RuntimeError(f"exact ELBO implementations disagree: {values}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    with pyro.validation_enabled(args.validate_timing):
        for step in range(args.timing_steps + 3):
            for name, fn in variants.items():
                start = time.perf_counter()
                optim.zero_grad()
                fn().backward()
                optim.step()
                if step >= 3:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    start = time.perf_counter()
    toy = Toy(args)
    pretrain(toy, args.pretrain_steps, args.lr)
    print(f"B={args.batch_size} S=T={args.length} (min {args.min_length}) V={args.vocab} "
          f"H={args.hidden}; {args.pretrain_steps} exact-ELBO steps; {args.draws} draws; "
          f"threads={args.threads} seed={args.seed}")
    rows = variance_rows(toy, args)
    print()
    print("Guide gradient at fixed parameters vs the exact gradient "
          f"(||g*|| = {rows[0][1].exact_norm:.1f})")
    header = f"{'estimator':44s} {'var/||g*||^2':>13s} {'rel. bias (floor)':>19s} "
    print(header + f"{'ms/draw':>8s}  note")
    for name, report, note in rows:
        bias = f"{report.relative_bias:.3f} ({report.noise_floor:.3f})"
        print(f"{name:44s} {report.relative_variance:13.3g} {bias:>19s} "
              f"{report.ms_per_draw:8.1f}  {note}")
    name, stats = sparse_row(args)
    print()
    print(f"{name}: after {args.sparse_steps} steps, S={args.length}:")
    print(f"  emission evaluations per query {stats['evaluations_per_query']:.0f} "
          f"(largest support in the batch), mean support {stats['mean_support']:.2f}, "
          f"S/2 = {args.length / 2:g}")
    print(f"  gradient vs full enumeration: relative error {stats['relative_gradient_error']:.1e}"
          f", objective gap {stats['objective_gap']:.1e} nats; "
          f"{stats['nats_per_token']:.3f} nats/token")
    timings = timing_rows(toy, args)
    reference = timings["hand-written PyTorch exact ELBO"]
    print()
    validation = "on" if args.validate_timing else "off"
    print(f"Per-step time of guide-side exact enumeration (forward+backward+Adam, median of "
          f"{args.timing_steps}, round-robin, validation {validation}):")
    for name, ms in timings.items():
        print(f"  {name:42s} {ms:7.1f} ms  {ms / reference:5.2f}x")
    by_name = {name: report for name, report, _ in rows}
    checks = [
        ("RLOO K=2 variance <= 3.5", by_name["RLOO K=2"].relative_variance <= 3.5),
        ("RLOO K=4 variance <= 1.2", by_name["RLOO K=4"].relative_variance <= 1.2),
        (f"sparse evaluations per query < S/2 = {args.length / 2:g}",
         stats["evaluations_per_query"] < args.length / 2),
        ("exact guide-side enumeration (plain torch) <= 1.1x hand-written",
         timings["structattn ExactEstimator (plain torch)"] <= 1.1 * reference),
        ("exact guide-side enumeration (Pyro traces, SVI style) <= 1.1x hand-written",
         timings["structattn ExactELBO (Pyro traces)"] <= 1.1 * reference),
        ("exact guide-side enumeration (Pyro traces, torch optimizer) <= 1.1x hand-written",
         timings["structattn ExactELBO, no pyro.module"] <= 1.1 * reference),
    ]
    print()
    for name, met in checks:
        print(f"  target {name}: {'met' if met else 'NOT met'}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
