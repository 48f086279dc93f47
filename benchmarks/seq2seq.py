"""Per-step training time of every Seq2Seq attention mode, as a ratio to soft attention.

One fixed G2P batch (cmudict), forward + backward + Adam step, medians over repeats, all
modes interleaved in the same loop so machine load affects them alike.  The issue's targets:
``variational-enum`` and ``segmentation`` (a binary chain CRF per target step, trained through
its forward-backward marginals) at most 2x ``soft``.

    python benchmarks/seq2seq.py            # B=64, hidden 128
    python benchmarks/seq2seq.py --quick    # fewer repeats
    python benchmarks/seq2seq.py --task bible --modes marginal,neural-hmm,variational-enum

``--task bible`` builds every model and batch from the Bible task's own defaults (sizes,
vocabularies, emission options; ``--batch-size`` batches of random training verses, a new one
each repeat, the same for every mode) and checks issue 11's limit: no mode above 4x soft.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from structattn.data.batching import collate_seq2seq
from structattn.data.g2p import load_g2p
from structattn.data.vocab import Vocab
from structattn.models.seq2seq import MODES, Seq2Seq

#: issue 11: no Bible mode may cost more than this many soft steps
BIBLE_STEP_LIMIT = 4.0


def _bible_setup(modes: list[str], args: argparse.Namespace, repeats: int):
    """Models built as ``structattn compare --task bible`` builds them, and ``repeats``
    batches of random training verses."""
    from structattn.app.architectures import get_architecture
    from structattn.app.experiment import ExperimentConfig
    from structattn.app.tasks import get_task

    task = get_task("bible")
    options = task.options({"batch_size": args.batch_size})
    config = ExperimentConfig.from_options({**options, "task": "bible", "mode": modes[0]})
    data = task.load(config)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(repeats):
        picks = torch.randperm(len(data.train), generator=generator)[: config.batch_size]
        batches.append(collate_seq2seq([data.train[i] for i in picks.tolist()],
                                       data.source_vocab, data.target_vocab).to(args.device))
    models = {}
    for mode in modes:
        torch.manual_seed(0)
        mode_config = ExperimentConfig.from_options({**options, "task": "bible", "mode": mode})
        models[mode] = get_architecture("rnn").build(mode_config, data).to(args.device)
    return models, batches, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("g2p", "bible"), default="g2p",
                        help="g2p: one fixed cmudict batch and the sizes below; bible: the "
                        "Bible task's defaults (sizes, vocabularies, emission), random verses")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per batch (default 64 for g2p, the task's for bible)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (even)")
    parser.add_argument("--embed-dim", type=int, default=64, help="embedding size")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per mode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="10 repeats, 2 warm-up steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 10, 2
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    if "soft" not in modes:
        modes.insert(0, "soft")

    total = args.warmup + args.repeats
    if args.task == "bible":
        models, batches, config = _bible_setup(modes, args, total)
        args.hidden = config.hidden
    else:
        splits = load_g2p(max_train=5000)
        source_vocab = Vocab.build([e.source for e in splits.train])
        target_vocab = Vocab.build([e.target for e in splits.train])
        batch = collate_seq2seq(splits.train[: args.batch_size or 64], source_vocab,
                                target_vocab)
        batches = [batch.to(args.device)] * total
        models = {}
        for mode in modes:
            torch.manual_seed(0)
            models[mode] = Seq2Seq(len(source_vocab), len(target_vocab), mode=mode,
                                   embed_dim=args.embed_dim, hidden=args.hidden).to(args.device)
    optimizers = {mode: torch.optim.Adam(model.parameters(), lr=1e-3)
                  for mode, model in models.items()}

    def step(mode: str, batch) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = models[mode].loss(batch)["loss"]
        optimizers[mode].zero_grad()
        loss.backward()
        optimizers[mode].step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for index in range(args.warmup):
        for mode in modes:
            step(mode, batches[index])
    times = {mode: [] for mode in modes}
    for index in range(args.warmup, total):
        for mode in modes:
            times[mode].append(step(mode, batches[index]))
    soft = statistics.median(times["soft"])
    batch = batches[-1]
    print(f"task {args.task}: batch {tuple(batch.source.shape)} -> "
          f"{tuple(batch.target.shape)}, hidden "
          f"{args.hidden}, device {args.device}, threads {args.threads}, "
          f"median of {args.repeats}")
    print(f"{'mode':18s} {'ms/step':>9s} {'x soft':>7s}")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode:18s} {1000 * median:9.2f} {median / soft:7.2f}")
    if args.task == "bible":
        worst = max(modes, key=lambda mode: statistics.median(times[mode]))
        ratio = statistics.median(times[worst]) / soft
        verdict = "PASS" if ratio <= BIBLE_STEP_LIMIT else "FAIL"
        print(f"slowest: {worst} {ratio:.2f}x soft (issue 11: at most "
              f"{BIBLE_STEP_LIMIT:g}x): {verdict}")


if __name__ == "__main__":
    main()
