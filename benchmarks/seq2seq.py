"""Per-step training time of every Seq2Seq attention mode, as a ratio to soft attention.

One fixed G2P batch (cmudict), forward + backward + Adam step, medians over repeats, all
modes interleaved in the same loop so machine load affects them alike.  The issue's targets:
``variational-enum`` and ``segmentation`` (a binary chain CRF per target step, trained through
its forward-backward marginals) at most 2x ``soft``.

    python benchmarks/seq2seq.py            # B=64, hidden 128
    python benchmarks/seq2seq.py --quick    # fewer repeats
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="words per batch")
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

    splits = load_g2p(max_train=5000)
    source_vocab = Vocab.build([e.source for e in splits.train])
    target_vocab = Vocab.build([e.target for e in splits.train])
    batch = collate_seq2seq(splits.train[: args.batch_size], source_vocab, target_vocab)
    batch = batch.to(args.device)
    models, optimizers = {}, {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode] = Seq2Seq(len(source_vocab), len(target_vocab), mode=mode,
                               embed_dim=args.embed_dim, hidden=args.hidden).to(args.device)
        optimizers[mode] = torch.optim.Adam(models[mode].parameters(), lr=1e-3)

    def step(mode: str) -> float:
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

    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step(mode))
    soft = statistics.median(times["soft"])
    print(f"batch {tuple(batch.source.shape)} -> {tuple(batch.target.shape)}, hidden "
          f"{args.hidden}, device {args.device}, threads {args.threads}, "
          f"median of {args.repeats}")
    print(f"{'mode':18s} {'ms/step':>9s} {'x soft':>7s}")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode:18s} {1000 * median:9.2f} {median / soft:7.2f}")


if __name__ == "__main__":
    main()
