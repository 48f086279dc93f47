"""Command line: ``structattn compare`` (soft vs hard alignments)."""

from __future__ import annotations

import argparse
import sys

import torch

from structattn.compare_copy import COPY_MODES, compare_copy

__all__ = ["build_parser", "main"]


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(COPY_MODES))
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or text!r}; choose from {', '.join(COPY_MODES)}"
        )
    return modes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structattn",
        description="Attention as a latent alignment: train and compare soft and hard "
        "alignments.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare = commands.add_parser(
        "compare",
        help="train soft and hard attention with the same budget and compare them",
        description="Train each attention mode with the same seed and budget, print one "
        "table row per mode and the alignments of a held-out example, and (with --out) write "
        "results.json and alignment heatmaps.",
    )
    compare.add_argument("--task", choices=["copy"], default="copy",
                         help="task: 'copy' is the aligned-copy toy task (target t reads "
                         "source t through a fixed token permutation, with noise)")
    compare.add_argument("--modes", type=_modes, default=list(COPY_MODES),
                         help="comma-separated modes: 'soft' (soft attention) and/or "
                         "'marginal' (hard attention, exact marginal likelihood); default: both")
    compare.add_argument("--steps", type=_positive, default=400,
                         help="training steps per mode (default 400)")
    compare.add_argument("--batch-size", type=_positive, default=32,
                         help="training batch size (default 32)")
    compare.add_argument("--length", type=_positive, default=20,
                         help="maximum sequence length; lengths vary in [length/2, length] "
                         "(default 20)")
    compare.add_argument("--vocab", type=_positive, default=50,
                         help="vocabulary size (default 50)")
    compare.add_argument("--hidden", type=_positive, default=64,
                         help="hidden size, even (default 64)")
    compare.add_argument("--noise", type=float, default=0.1,
                         help="probability that a target token is random (default 0.1)")
    compare.add_argument("--lr", type=float, default=3e-3,
                         help="Adam learning rate (default 3e-3)")
    compare.add_argument("--eval-size", type=_positive, default=256,
                         help="held-out pairs for evaluation (default 256)")
    compare.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    compare.add_argument("--device", default="cpu",
                         help="torch device, e.g. 'cpu' or 'cuda' (default cpu)")
    compare.add_argument("--threads", type=_positive, default=1,
                         help="torch CPU threads (default 1; more thrash on small machines)")
    compare.add_argument("--quick", action="store_true",
                         help="a fast smoke run: 60 steps, 64 evaluation pairs")
    compare.add_argument("--out", default=None,
                         help="folder for results.json and PNG heatmaps (default: print only)")
    compare.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.eval_size = min(args.steps, 60), min(args.eval_size, 64)
    if args.hidden % 2:
        print("error: --hidden must be even", file=sys.stderr)
        return 2
    if args.command == "compare":
        compare_copy(args, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
