"""Word alignment with IBM Model 1 and the HMM aligner written as Pyro models.

English (KJV) -> Spanish (Reina-Valera 1909) Bible verses, scored against the reference links
that the two texts' Strong's numbers give (alignment error rate, precision, recall on the held-out
test books; :mod:`structattn.data.bible`). Both models live in
:mod:`structattn.models.word_alignment`:

* IBM Model 1: ``z_t ~ CategoricalAlignment`` (uniform over the source words and NULL),
  enumerated by ``TraceEnum_ELBO``; the target word is observed through
  ``sa.infer.observe_alignment_emission`` from a precomputed ``(pairs, T, S + 1)`` table;
* the HMM aligner (Vogel jumps, Och & Ney NULL): the alignment chain summed out inside the
  model by ``sa.HMMAlignment`` (one factor per pair, ``Trace_ELBO``), and for Viterbi the same
  chain written out with one enumerated site per word under ``pyro.markov`` (the transition row
  read at the previous state with ``sa.infer.gather_along``).

Training is EM with the ELBO's exact ``log p(y | x)``: its gradient with respect to the
emission table is the posterior of every link, the expected counts. Viterbi alignments come
from ``infer_discrete``; posterior alignments keep links whose posterior is >= ``--threshold``.
Both directions are trained (apart, or together by agreement: Liang, Taskar & Klein 2006) and
symmetrised (intersection, grow-diag-final-and, and the average of the two directions'
posteriors with a threshold chosen on the dev books). Following the
project's convention, a link is judged when its Spanish word carries a reference link
(untagged words have no reference); the AER over all words is reported too (``aer_all``).

    python examples/word_alignment.py                 # 5,000 verses, both models, both directions
    python examples/word_alignment.py --agreement     # the directions trained by agreement
    python examples/word_alignment.py --backend torch # the hand-written baseline, same numbers
    python examples/word_alignment.py --smoke-test
"""

import argparse
import json
import logging
import time
from pathlib import Path

import pyro
import torch

from structattn.app.metrics import alignment_error_rate
from structattn.data.bible import load_bible
from structattn.models.word_alignment import (
    SYMMETRIZERS,
    HMMAligner,
    IBM1Aligner,
    fit_by_agreement,
    posterior_average_links,
)

logging.basicConfig(format="[%(relativeCreated)7.0f ms] %(message)s", level=logging.INFO)


def judged(links, pairs):
    """Keep the links whose Spanish word carries a reference link."""
    result = []
    for found, pair in zip(links, pairs, strict=True):
        linked = {t for _, t in pair.possible}
        result.append({(s, t) for s, t in found if t in linked})
    return result


def score(name, links, pairs, results=None):
    sure = [set(p.sure) for p in pairs]
    possible = [set(p.possible) for p in pairs]
    scores = alignment_error_rate(judged(links, pairs), sure, possible)
    everything = alignment_error_rate(links, sure, possible)
    if results is None:
        return everything.aer
    results[name] = {"aer": scores.aer, "precision": scores.precision, "recall": scores.recall,
                     "aer_all": everything.aer}
    logging.info("%-34s AER %.3f  P %.3f  R %.3f  (all words: AER %.3f)", name, scores.aer,
                 scores.precision, scores.recall, everything.aer)


def train_by_agreement(args, pairs):
    """Both directions at once, IBM Model 1 then the HMM, each stage by agreement."""
    options = dict(backend=args.backend, max_cells=args.max_cells, smoothing=args.smoothing)

    def progress(model):
        return lambda epoch, links: logging.info(
            "%s by agreement epoch %d  agreed links %.1f", model, epoch, links)

    ibm1 = {"en-es": IBM1Aligner(**options), "es-en": IBM1Aligner(**options)}
    fit_by_agreement(ibm1["en-es"], ibm1["es-en"], pairs, args.ibm1_epochs,
                     log_every=progress("ibm1"))
    hmm = {}
    for direction, start in ibm1.items():
        hmm[direction] = HMMAligner(max_jump=args.max_jump,
                                    null_probability=args.null_probability, **options)
        hmm[direction].source_vocab, hmm[direction].target_vocab = (start.source_vocab,
                                                                    start.target_vocab)
        hmm[direction].log_t = start.log_t
    fit_by_agreement(hmm["en-es"], hmm["es-en"], pairs, args.hmm_epochs, args.learning_rate,
                     log_every=progress("hmm"))
    return {direction: {"ibm1": ibm1[direction], "hmm": hmm[direction]} for direction in ibm1}


def train_direction(args, pairs, direction):
    def progress(model):
        return lambda epoch, value: logging.info(
            "%s %s epoch %d  log p(y|x) = %.1f", direction, model, epoch, value)

    options = dict(backend=args.backend, max_cells=args.max_cells, smoothing=args.smoothing)
    ibm1 = IBM1Aligner(**options).fit(pairs, args.ibm1_epochs, log_every=progress("ibm1"))
    hmm = HMMAligner(max_jump=args.max_jump, null_probability=args.null_probability, **options)
    hmm.source_vocab, hmm.target_vocab, hmm.log_t = ibm1.source_vocab, ibm1.target_vocab, ibm1.log_t
    hmm.fit(pairs, args.hmm_epochs, learning_rate=args.learning_rate, log_every=progress("hmm"))
    return {"ibm1": ibm1, "hmm": hmm}


def main(args):
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_bible(max_train=args.train_size, max_length=args.max_length, lowercase=True)
    test = list(splits.test)[: args.test_size]
    forward_train = [(p.source, p.target) for p in splits.train]
    backward_train = [(t, s) for s, t in forward_train]
    forward_test = [(p.source, p.target) for p in test]
    backward_test = [(t, s) for s, t in forward_test]
    logging.info("train %d verses (<= %d tokens), test %d verses; backend %s",
                 len(forward_train), args.max_length, len(test), args.backend)
    start = time.time()
    if args.agreement:
        models = train_by_agreement(args, forward_train)
    else:
        models = {"en-es": train_direction(args, forward_train, "en-es"),
                  "es-en": train_direction(args, backward_train, "es-en")}
    results: dict = {"train_seconds": time.time() - start}
    for name in ("ibm1", "hmm"):
        links = {}
        for decoding in ("viterbi", "posterior"):
            forward = models["en-es"][name].align(forward_test, decoding, args.threshold)
            backward = models["es-en"][name].align(backward_test, decoding, args.threshold)
            backward = [{(s, t) for t, s in found} for found in backward]
            score(f"{name} en-es {decoding}", forward, test, results)
            score(f"{name} es-en {decoding}", backward, test, results)
            for method in args.symmetrize:
                combined = [SYMMETRIZERS[method](f, b)
                            for f, b in zip(forward, backward, strict=True)]
                score(f"{name} {method} {decoding}", combined, test, results)
            links[decoding] = forward
        if args.save_links:
            with open(out / f"{name}_links.txt", "w") as stream:
                for found in links["viterbi"]:
                    stream.write(" ".join(f"{s}-{t}" for s, t in sorted(found)) + "\n")
    # soft symmetrisation: average the two directions' posteriors; threshold chosen on dev
    dev = list(splits.dev)[: args.test_size]
    for name in ("ibm1", "hmm"):
        posteriors = {}
        for split, pairs in (("dev", dev), ("test", test)):
            forward = models["en-es"][name].posteriors([(p.source, p.target) for p in pairs])
            backward = models["es-en"][name].posteriors([(p.target, p.source) for p in pairs])
            posteriors[split] = list(zip(forward, backward, strict=True))

        def links_at(split, threshold, posteriors=posteriors):
            return [posterior_average_links(f, b, threshold) for f, b in posteriors[split]]

        best = min(args.thresholds, key=lambda tau: score("", links_at("dev", tau), dev))
        logging.info("%s posterior average: threshold %.2f chosen on dev", name, best)
        score(f"{name} posterior-average {best:.2f}", links_at("test", best), test, results)
    results["args"] = vars(args)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("results in %s", out / "results.json")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=5000,
                        help="training verses (the first ones of the training books)")
    parser.add_argument("--max-length", type=int, default=40,
                        help="drop training verses longer than this on either side")
    parser.add_argument("--test-size", type=int, default=None,
                        help="score only the first N test verses (default: all 1,382)")
    parser.add_argument("--ibm1-epochs", type=int, default=5, help="EM passes of IBM Model 1")
    parser.add_argument("--hmm-epochs", type=int, default=5,
                        help="EM passes of the HMM aligner (started from IBM Model 1)")
    parser.add_argument("--max-jump", type=int, default=7,
                        help="jumps wider than this share the end buckets")
    parser.add_argument("--null-probability", type=float, default=0.2,
                        help="HMM probability of moving to a NULL state")
    parser.add_argument("--smoothing", type=float, default=1e-3,
                        help="added to every expected count in the M-step")
    parser.add_argument("--learning-rate", type=float, default=0.1,
                        help="Adam step size of the jump scores")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="posterior decoding keeps links with posterior >= this")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6],
                        help="posterior-average thresholds tried on dev (best one scored on test)")
    parser.add_argument("--symmetrize", nargs="+", default=["intersection", "grow-diag-final-and"],
                        choices=sorted(SYMMETRIZERS), help="ways to combine the two directions")
    parser.add_argument("--agreement", action="store_true",
                        help="train the two directions by agreement (Liang et al. 2006)")
    parser.add_argument("--backend", choices=["pyro", "torch"], default="pyro",
                        help="Pyro models under TraceEnum_ELBO, or the hand-written baseline")
    parser.add_argument("--max-cells", type=int, default=4_000_000,
                        help="batch budget in T * S^2 cells")
    parser.add_argument("--save-links", action="store_true",
                        help="write the Viterbi links of the test verses under --out")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", default="runs/word_alignment", help="output folder")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny run (100 verses <= 15 tokens, 1 epoch each, 10 test verses)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.train_size, args.max_length, args.test_size = 100, 15, 10
        args.ibm1_epochs = args.hmm_epochs = 1
    return args


if __name__ == "__main__":
    main(parse_args())
