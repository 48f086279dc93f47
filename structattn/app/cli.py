"""Command line: ``structattn compare | train | eval | plot``.

Heavy modules (torch, pyro, the models) are imported only by the command that runs, so
``structattn --help`` answers at once.  Options left unset take the task's defaults
(:mod:`structattn.app.tasks`); ``--quick`` fills only options the user did not give.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]

COMMANDS = {
    "compare": "train several attention modes with the same budget and compare them",
    "train": "train one mode, with checkpoints and --resume",
    "eval": "evaluate a checkpoint written by 'train' or 'compare'",
    "plot": "draw alignment heatmaps of a checkpoint",
}
# Run options every seq2seq task reads; None = the task's default.
_RUN_KEYS = ("steps", "batch_size", "hidden", "embed_dim", "dropout", "lr", "num_samples",
             "temperature", "max_train", "max_length", "vocab_size", "target_vocab_size",
             "eval_size", "dev_size",
             "dev_every", "beam_size", "seed", "device", "arch", "batch_vocabulary")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
#: --emission NAME -> the Seq2Seq emission options it sets (see docs/seq2seq.md)
EMISSIONS = {
    "contextual": {"lexical_emission": False, "contextual_emission": True,
                   "stateful_emission": True},
    "lexical": {"lexical_emission": True, "contextual_emission": True,
                "stateful_emission": True},
    "word": {"lexical_emission": True, "contextual_emission": False,
             "stateful_emission": False},
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise argparse.ArgumentTypeError(f"no mode named in {text!r}")
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"a mode is repeated in {text!r}")
    return modes


def _tasks(trainable_only: bool) -> dict[str, str]:
    from structattn.app.tasks import TASKS

    return {name: cls.description for name, cls in TASKS.items()
            if cls.trainable or not trainable_only}


def _add_run_options(parser: argparse.ArgumentParser, trainable_only: bool) -> None:
    tasks = _tasks(trainable_only)
    parser.add_argument("--task", choices=sorted(tasks), default="g2p",
                        help="; ".join(f"'{n}': {d}" for n, d in tasks.items())
                        + " (default g2p)")
    parser.add_argument("--arch", choices=["rnn", "transformer"], default=None,
                        help="model: 'rnn' (bi-LSTM encoder, LSTM decoder; default) or "
                        "'transformer' (pre-norm Transformer, d_model = --hidden, whose last "
                        "cross-attention is the latent alignment; its modes: soft, sparsemax, "
                        "entmax15, entmax-learned, marginal, hard-score, variational-enum)")
    parser.add_argument("--steps", type=_positive, help="training steps per mode "
                        "(default: g2p 3000, bible 3000)")
    parser.add_argument("--batch-size", type=_positive,
                        help="training batch size (default: g2p 64, bible 32)")
    parser.add_argument("--hidden", type=_positive, help="hidden size, even (default 128)")
    parser.add_argument("--embed-dim", type=_positive, help="embedding size (default 64)")
    parser.add_argument("--dropout", type=float, help="dropout (default: g2p 0.1, bible 0.3)")
    parser.add_argument("--emission", choices=sorted(EMISSIONS), default=None,
                        help="what the output layer reads at the aligned source position "
                        "(rnn only): 'contextual' = decoder state + BiLSTM state (default for "
                        "g2p); 'lexical' = those plus the source word's embedding; 'word' = "
                        "the source word alone, a translation table, the decoder steering only "
                        "the alignment (default for bible)")
    parser.add_argument("--batch-vocabulary", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="train the output softmax over the batch's target words only "
                        "(evaluation keeps the full softmax; rnn only; default: on for bible, "
                        "off for g2p)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--num-samples", type=_positive,
                        help="draws per query for the sampling estimators (default 4)")
    parser.add_argument("--temperature", type=float,
                        help="Gumbel-softmax temperature of variational-st (default 1.0)")
    parser.add_argument("--max-train", type=_positive,
                        help="use only the first N training examples (default: all)")
    parser.add_argument("--max-length", type=_positive,
                        help="bible: drop training verses longer than this (default 24; "
                        "--quick 16)")
    parser.add_argument("--vocab-size", type=_positive,
                        help="bible: source (English) word vocabulary (default 10000: every "
                        "training word)")
    parser.add_argument("--target-vocab-size", type=_positive,
                        help="bible: target (Spanish) word vocabulary; with a contextual "
                        "emission the exact modes pay for it at every source position "
                        "(default 10000: every training word)")
    parser.add_argument("--eval-size", type=_positive,
                        help="test examples to evaluate (default: the whole test split)")
    parser.add_argument("--dev-size", type=_positive,
                        help="dev examples for model selection (default: g2p 1000, bible 200)")
    parser.add_argument("--dev-every", type=_positive,
                        help="steps between dev evaluations (default 250)")
    parser.add_argument("--beam-size", type=_positive,
                        help="beam width for decoding; 1 is greedy (default: g2p 5, bible 3; "
                        "g2p --quick 3)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="'cpu' or 'cuda[:N]' (bf16 autocast on CUDA; default cpu)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default 1; more thrash on small machines)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars and dev lines (result rows are always printed)")


def _modes_help() -> str:
    from structattn.app.compare import mode_descriptions

    described = mode_descriptions()
    return ("comma-separated modes (default soft,marginal,variational-enum,hard-score; bible "
            "adds neural-hmm); "
            + "; ".join(f"'{name}': {text}" if text else f"'{name}'"
                        for name, text in described.items())
            + "; --arch transformer adds 'entmax-learned' (alpha learned per head); "
            "copy task: soft, marginal; tableqa task: soft (TAPAS expected result), enum "
            "(exact over column x operator), hard-score (sampled programs, leave-one-out "
            "baseline), sparse (entmax cell/column choices)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` only that sub-command gets its options.

    Building a sub-command's options reads the task and mode registries (which import torch);
    the top-level parser without ``command`` imports nothing heavy.
    """
    parser = argparse.ArgumentParser(
        prog="structattn",
        description="Attention as a latent alignment: train, evaluate and compare soft and "
        "hard alignments on real data that ships inside packages.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {name: commands.add_parser(name, help=text) for name, text in COMMANDS.items()}
    if command in subparsers:
        {"compare": _compare_options, "train": _train_options, "eval": _eval_options,
         "plot": _plot_options}[command](subparsers[command])
    return parser


def _compare_options(compare: argparse.ArgumentParser) -> None:
    compare.description = (
        "Train each mode with the same data, seeds and budget; keep each run's best-dev "
        "parameters; score the whole test split; print every metric with a 95% bootstrap "
        "interval, each mode's paired test against soft attention and the best mode per "
        "metric; with --out write results.json (configuration, versions, per-example scores) "
        "and figures.")
    _add_run_options(compare, trainable_only=False)
    compare.add_argument("--modes", type=_modes, default=None, help=_modes_help())
    compare.add_argument("--seeds", type=_positive, default=1,
                         help="training seeds per mode (default 1); the table adds the mean "
                         "and standard deviation across seeds")
    compare.add_argument("--resamples", type=_positive, default=1000,
                         help="bootstrap and permutation resamples (default 1000)")
    compare.add_argument("--quick", action="store_true",
                         help="a short run for options you did not set: 300 steps, beam 3, "
                         "1000 test words (g2p) / 200 verses (bible); copy task 60 steps")
    compare.add_argument("--out", type=Path, default=None,
                         help="folder for results.json, figures and checkpoints (table QA: "
                         "runs/tableqa when not given); one that holds an earlier "
                         "comparison's results is refused unless --overwrite")
    compare.add_argument("--overwrite", action="store_true",
                         help="replace the results (and checkpoints) of an earlier comparison "
                         "in --out")


def _train_options(train: argparse.ArgumentParser) -> None:
    from structattn.app.architectures import ARCHITECTURES

    modes = sorted({mode for arch in ARCHITECTURES.values() for mode in arch.modes()})
    train.description = ("Train one attention mode; checkpoints are written atomically to "
                         "--out every --checkpoint-every steps and at the end; --resume "
                         "continues exactly.")
    _add_run_options(train, trainable_only=True)
    train.add_argument("--mode", choices=modes, default="soft",
                       help="attention mode (see 'compare --help'; the transformer's own: "
                       "entmax-learned)")
    train.add_argument("--out", type=Path, required=True,
                       help="folder for checkpoint.pt and metrics.json")
    train.add_argument("--checkpoint-every", type=_positive, default=500,
                       help="steps between checkpoints (default 500)")
    train.add_argument("--resume", action="store_true",
                       help="continue from --out/checkpoint.pt if it exists")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh even though --out holds an earlier run's checkpoint, "
                       "replacing it (without --resume or --overwrite such a folder is "
                       "refused)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue even if settings (mode, lr, seed, batch "
                       "size, ...) differ from the checkpoint's (refused otherwise)")


def _eval_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.description = "Load a checkpoint and print its metrics on a split."
    evaluate.add_argument("checkpoint", type=Path, help="path to checkpoint.pt")
    evaluate.add_argument("--split", choices=["dev", "test"], default="test",
                          help="split to evaluate (default test)")
    evaluate.add_argument("--eval-size", type=_positive, default=None,
                          help="number of examples (default: the whole split)")
    evaluate.add_argument("--beam-size", type=_positive, default=None,
                          help="beam width (default: as trained)")
    evaluate.add_argument("--device", type=_device, default="cpu",
                          help="torch device (default cpu)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _plot_options(plot: argparse.ArgumentParser) -> None:
    plot.description = ("Load a checkpoint and draw attention and posterior heatmaps of "
                        "held-out examples.")
    plot.add_argument("checkpoint", type=Path, help="path to checkpoint.pt")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    plot.add_argument("--count", type=_positive, default=2, help="examples to draw (default 2)")
    plot.add_argument("--device", type=_device, default="cpu",
                      help="torch device (default cpu)")


def _given(args: argparse.Namespace) -> dict:
    given = {key: getattr(args, key, None) for key in _RUN_KEYS}
    emission = getattr(args, "emission", None)
    return {**given, **EMISSIONS[emission]} if emission else given


def _compare(args: argparse.Namespace) -> int:
    from structattn.app.tasks import Seq2SeqTask, get_task

    task = get_task(args.task)
    options = task.options(_given(args), quick=args.quick)
    if not isinstance(task, Seq2SeqTask):
        modes = args.modes or list(task.default_modes())
        task.compare(modes, args.out, options, args.seeds, args.quick, not args.no_progress,
                     overwrite=args.overwrite)
        return 0
    from structattn.app.compare import compare_modes
    from structattn.app.experiment import ExperimentConfig

    modes = args.modes or list(task.default_modes(options.get("arch") or "rnn"))

    config = ExperimentConfig.from_options({**options, "task": args.task, "mode": modes[0]})
    compare_modes(config, modes, args.out, seeds=args.seeds, progress=not args.no_progress,
                  resamples=args.resamples, overwrite=args.overwrite)
    return 0


def _train(args: argparse.Namespace) -> int:
    from structattn.app.evaluation import evaluate_mode
    from structattn.app.experiment import ExperimentConfig, load_task, train_mode
    from structattn.app.outputs import write_json
    from structattn.app.tasks import get_task

    options = get_task(args.task).options(_given(args))
    config = ExperimentConfig.from_options({**options, "task": args.task, "mode": args.mode,
                                            "checkpoint_every": args.checkpoint_every})
    data = load_task(config)
    model, trained = train_mode(config, data, args.out, resume=args.resume,
                                allow_config_change=args.allow_config_change,
                                progress=not args.no_progress, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 evaluates
        return 0
    evaluation = evaluate_mode(model, config, data, "dev", progress=not args.no_progress)
    metrics = {"mode": config.mode, "split": "dev", **evaluation.metrics,
               "best_step": trained.best_step, "seconds": trained.seconds,
               "ms_per_step": trained.ms_per_step, "dev_curve": trained.dev_curve}
    write_json(args.out / "metrics.json", metrics, indent=2)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from structattn.app.evaluation import evaluate_mode
    from structattn.app.experiment import load_model

    model, config, data = load_model(args.checkpoint, args.device)
    config.eval_size = args.eval_size
    if args.beam_size:
        config.beam_size = args.beam_size
    evaluation = evaluate_mode(model, config, data, args.split, progress=not args.no_progress)
    print(json.dumps({"mode": config.mode, "split": args.split, **evaluation.metrics},
                     indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from structattn.app.evaluation import evaluate_mode
    from structattn.app.experiment import load_model
    from structattn.app.plots import plot_alignments
    from structattn.app.tasks import get_task

    model, config, data = load_model(args.checkpoint, args.device)
    task = get_task(config.task)
    examples = [ex for ex in data.test if len(ex.source) <= 24 and len(ex.target) <= 24]
    examples = examples[:args.count]
    evaluation = evaluate_mode(model, config, data, examples=examples)
    for index, example in enumerate(examples):
        gold = {(s, t) for s, t in example.sure} if getattr(task, "has_gold_links", False) \
            else None
        path = plot_alignments(
            {f"{config.mode}: attention p(z|x,y<t)": evaluation.attention[index],
             f"{config.mode}: posterior p(z|x,y)": evaluation.posterior[index]},
            args.out / f"{config.task}_example{index}.png", source=list(example.source),
            target=list(example.target) + ["</s>"],
            title=f"{config.task} '{task.label(example)}': rows = reference target",
            gold=gold, target_label="reference target",
            captions=[f"reference  : {' '.join(example.target)}",
                      f"beam output: {' '.join(evaluation.hypotheses[index])}"])
        print(f"wrote {path}")
    return 0


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if args.command == "compare" and args.modes:
        from structattn.app.tasks import Seq2SeqTask, get_task

        task = get_task(args.task)
        available = (task.modes(args.arch or "rnn") if isinstance(task, Seq2SeqTask)
                     else task.modes())
        unknown = [mode for mode in args.modes if mode not in available]
        if unknown:
            parser.error(f"--modes {','.join(unknown)}: not a mode of task {args.task!r} "
                         f"(its modes: {', '.join(available)})")
    import torch

    torch.set_num_threads(getattr(args, "threads", 1))
    if getattr(args, "hidden", None) and args.hidden % 2:
        print("error: --hidden must be even", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    from structattn.app.training.errors import RunDirectoryError

    try:
        handler = {"compare": _compare, "train": _train, "eval": _eval, "plot": _plot}
        return handler[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
