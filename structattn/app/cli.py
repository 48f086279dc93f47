"""Command line: ``structattn compare | train | eval | plot``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from structattn.app.compare_copy import COPY_MODES, compare_copy
from structattn.app.training.errors import RunDirectoryError
from structattn.models.seq2seq import MODES

__all__ = ["build_parser", "main"]

DEFAULT_MODES = ("soft", "marginal", "variational-enum", "hard-score")
# --quick: a budget that finishes the default comparison in a few minutes on 2 CPU cores
QUICK = {"steps": 300, "max_train": 20000, "eval_size": 300, "beam_size": 3}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = set(MODES) | set(COPY_MODES)
    unknown = sorted(set(modes) - known)
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or text!r}; seq2seq modes: {', '.join(MODES)}; "
            f"copy task: {', '.join(COPY_MODES)}"
        )
    return modes


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=["g2p", "bible", "copy"], default="g2p",
                        help="'g2p': grapheme-to-phoneme on cmudict (default); 'bible': "
                        "English->Spanish Bible verses with Strong's-number reference links "
                        "(needs the Debian packages sword-text-kjv and sword-text-sparv); "
                        "'copy': the aligned-copy toy task")
    parser.add_argument("--steps", type=_positive, default=None,
                        help="training steps per mode (default 3000; copy task 400)")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="training batch size (default 64; copy task 32)")
    parser.add_argument("--hidden", type=_positive, default=None,
                        help="hidden size, even (default 128; copy task 64)")
    parser.add_argument("--embed-dim", type=_positive, default=64,
                        help="embedding size (seq2seq tasks, default 64)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout (seq2seq tasks, default 0.1)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default 2e-3; copy task 3e-3)")
    parser.add_argument("--num-samples", type=_positive, default=4,
                        help="draws per query for the sampling estimators (default 4)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="Gumbel-softmax temperature of variational-st (default 1.0)")
    parser.add_argument("--max-train", type=_positive, default=None,
                        help="use only the first N training examples (default: all)")
    parser.add_argument("--max-length", type=_positive, default=40,
                        help="bible: drop training verses longer than this (default 40)")
    parser.add_argument("--vocab-size", type=_positive, default=8000,
                        help="bible: word vocabulary size per language (default 8000)")
    parser.add_argument("--eval-size", type=_positive, default=None,
                        help="held-out examples to evaluate (default 1000; copy task 256)")
    parser.add_argument("--beam-size", type=_positive, default=5,
                        help="beam width for decoding; 1 is greedy (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="torch device: 'cpu' or 'cuda' (bf16 autocast on CUDA; default cpu)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default 1; more thrash on small machines)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structattn",
        description="Attention as a latent alignment: train, evaluate and compare soft and "
        "hard alignments on real data that ships inside packages.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compare = commands.add_parser(
        "compare", help="train several attention modes with the same budget and compare them",
        description="Train each mode with the same data, seed and budget; print one table "
        "row per mode; with --out write results.json and heatmaps of the same held-out "
        "examples (attention next to the exact hard-attention posterior).",
    )
    _add_run_options(compare)
    compare.add_argument("--modes", type=_modes, default=None,
                         help=f"comma-separated modes (default {','.join(DEFAULT_MODES)}; "
                         f"all: {','.join(MODES)}; copy task: {','.join(COPY_MODES)})")
    compare.add_argument("--quick", action="store_true",
                         help="a short run: 300 steps, 20k training words, 300 evaluation "
                         "examples, beam 3 (copy task: 60 steps)")
    compare.add_argument("--out", type=Path, default=None,
                         help="folder for results.json, heatmaps and checkpoints")

    train = commands.add_parser(
        "train", help="train one mode, with checkpoints and --resume",
        description="Train one attention mode; checkpoints are written atomically to --out "
        "every --checkpoint-every steps and at the end; --resume continues exactly.",
    )
    _add_run_options(train)
    train.add_argument("--mode", choices=MODES, default="soft", help="attention mode")
    train.add_argument("--out", type=Path, required=True,
                       help="folder for checkpoint.pt and metrics.json")
    train.add_argument("--checkpoint-every", type=_positive, default=500,
                       help="steps between checkpoints (default 500)")
    train.add_argument("--resume", action="store_true",
                       help="continue from --out/checkpoint.pt if it exists")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue even if settings (mode, lr, seed, batch "
                       "size, ...) differ from the checkpoint's (refused otherwise)")

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint written by 'train'",
        description="Load a checkpoint and print its metrics on a split.")
    evaluate.add_argument("checkpoint", type=Path, help="path to checkpoint.pt")
    evaluate.add_argument("--split", choices=["dev", "test"], default="test",
                          help="split to evaluate (default test)")
    evaluate.add_argument("--eval-size", type=_positive, default=None,
                          help="number of examples (default: as trained)")
    evaluate.add_argument("--beam-size", type=_positive, default=None,
                          help="beam width (default: as trained)")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")

    plot = commands.add_parser(
        "plot", help="draw alignment heatmaps of a checkpoint",
        description="Load a checkpoint and draw attention and posterior heatmaps of the first "
        "held-out examples.")
    plot.add_argument("checkpoint", type=Path, help="path to checkpoint.pt")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    plot.add_argument("--count", type=_positive, default=2, help="examples to draw (default 2)")
    plot.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def _seq2seq_config(args, mode: str):
    from structattn.app.experiment import ExperimentConfig

    return ExperimentConfig(
        task=args.task, mode=mode, steps=args.steps or 3000, batch_size=args.batch_size or 64,
        embed_dim=args.embed_dim, hidden=args.hidden or 128, dropout=args.dropout,
        lr=args.lr or 2e-3, num_samples=args.num_samples, temperature=args.temperature,
        max_train=args.max_train, max_length=args.max_length, eval_size=args.eval_size or 1000,
        beam_size=args.beam_size, seed=args.seed, device=args.device,
        vocab_size=args.vocab_size,
        checkpoint_every=getattr(args, "checkpoint_every", None),
    )


def _compare(args) -> int:
    if args.task == "copy":
        modes = args.modes or list(COPY_MODES)
        if set(modes) - set(COPY_MODES):
            print(f"error: the copy task has modes {', '.join(COPY_MODES)}", file=sys.stderr)
            return 2
        steps, eval_size = args.steps or 400, args.eval_size or 256
        if args.quick:
            steps, eval_size = min(steps, 60), min(eval_size, 64)
        copy_args = argparse.Namespace(
            modes=modes, steps=steps, batch_size=args.batch_size or 32, length=20, vocab=50,
            hidden=args.hidden or 64, noise=0.1, lr=args.lr or 3e-3, eval_size=eval_size,
            seed=args.seed, device=args.device, out=args.out,
        )
        compare_copy(copy_args, progress=not args.no_progress)
        return 0
    from structattn.app.experiment import compare_modes

    modes = args.modes or list(DEFAULT_MODES)
    bad = sorted(set(modes) - set(MODES))
    if bad:
        print(f"error: {bad} are not seq2seq modes ({', '.join(MODES)})", file=sys.stderr)
        return 2
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.beam_size = min(args.beam_size, QUICK["beam_size"])
    compare_modes(_seq2seq_config(args, modes[0]), modes, args.out,
                  progress=not args.no_progress)
    return 0


def _train(args) -> int:
    from structattn.app.experiment import evaluate_mode, load_task, train_mode

    if args.task == "copy":
        print("error: 'train' runs the seq2seq tasks (g2p, bible)", file=sys.stderr)
        return 2
    config = _seq2seq_config(args, args.mode)
    data = load_task(config)
    model, timing = train_mode(config, data, args.out, resume=args.resume,
                               allow_config_change=args.allow_config_change,
                               progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 evaluates
        return 0
    metrics = {"mode": config.mode, **evaluate_mode(model, config, data, "dev"), **timing}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


def _eval(args) -> int:
    from structattn.app.experiment import evaluate_mode, load_model

    model, config, data = load_model(args.checkpoint, args.device)
    if args.eval_size:
        config.eval_size = args.eval_size
    if args.beam_size:
        config.beam_size = args.beam_size
    metrics = {"mode": config.mode, "split": args.split,
               **evaluate_mode(model, config, data, args.split)}
    print(json.dumps(metrics, indent=2))
    return 0


def _plot(args) -> int:
    from structattn.app.experiment import load_model, plot_examples

    model, config, data = load_model(args.checkpoint, args.device)
    for path in plot_examples({config.mode: model}, config, data, args.out, count=args.count):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    if getattr(args, "hidden", None) and args.hidden % 2:
        print("error: --hidden must be even", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        handler = {"compare": _compare, "train": _train, "eval": _eval, "plot": _plot}
        return handler[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
