"""Forward+backward time of structattn's simplex maps against torch.softmax and entmax.

One run measures, at each shape, ``torch.softmax``, our ``sparsemax``, ``entmax15`` and
``entmax_bisect`` and the ``entmax`` package's functions of the same name, interleaved in the
same loop so that load from other processes hits all of them alike, and prints medians with
ratios to softmax and to entmax.  ``entmax`` is a benchmark-only dependency.

    python benchmarks/simplex_maps.py            # full run
    python benchmarks/simplex_maps.py --quick    # a few repeats, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from structattn import functional

DEFAULT_SHAPES = ((4096, 64), (1024, 512), (256, 4096))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        default=",".join(f"{rows}x{keys}" for rows, keys in DEFAULT_SHAPES),
        help="comma-separated ROWSxKEYS shapes (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=41, help="timed repeats per method and shape (default 41)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per method before timing (default 3)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.5,
        help="alpha of entmax_bisect for both libraries (default 1.5; for 1.5 ours uses the "
        "exact entmax15 kernel, so an extra row times our iterative path at alpha+0.0001)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="standard deviation of the random scores"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run our maps without torch.compile (STRUCTATTN_COMPILE=0 does the same)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--quick", action="store_true", help="5 repeats and 1 warm-up call: a smoke test"
    )
    return parser.parse_args()


def forward_backward(
    fn: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor, cotangent: torch.Tensor
) -> float:
    """Seconds for one forward pass and the backward pass of ``<fn(scores), cotangent>``."""
    leaf = scores.detach().requires_grad_(True)
    start = time.perf_counter()
    out = fn(leaf)
    out.backward(cotangent)
    return time.perf_counter() - start


def methods(alpha: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    import entmax

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "softmax": lambda x: torch.softmax(x, -1),
        "sparsemax": functional.sparsemax,
        "entmax:sparsemax": lambda x: entmax.sparsemax(x, -1),
        "entmax15": functional.entmax15,
        "entmax:entmax15": lambda x: entmax.entmax15(x, -1),
        f"entmax_bisect a={alpha:g}": lambda x: functional.entmax_bisect(x, alpha),
        f"entmax:entmax_bisect a={alpha:g}": lambda x: entmax.entmax_bisect(x, alpha),
    }
    if alpha in (1.0, 1.5, 2.0):
        iterative = alpha + 1e-4
        table[f"entmax_bisect a={iterative:g}"] = lambda x: functional.entmax_bisect(x, iterative)
        table[f"entmax:entmax_bisect a={iterative:g}"] = lambda x: entmax.entmax_bisect(
            x, iterative
        )
    return table


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.eager:
        functional.COMPILE = False
    repeats, warmup = (5, 1) if args.quick else (args.repeats, args.warmup)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    table = methods(args.alpha)
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes slow every row)")
    print(
        f"torch {torch.__version__}, threads={args.threads}, compile={functional.COMPILE}, "
        f"repeats={repeats}, scores ~ N(0, {args.scale:g}^2), forward+backward median ms"
    )
    header = f"{'shape':>10}  {'method':<28} {'ms':>8} {'x softmax':>10} {'x entmax':>9}"
    print(header)
    print("-" * len(header))
    for rows, keys in shapes:
        scores = torch.randn(rows, keys) * args.scale
        cotangent = torch.randn(rows, keys)
        for fn in table.values():
            for _ in range(warmup):
                forward_backward(fn, scores, cotangent)
        times: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(repeats):
            for name, fn in table.items():
                times[name].append(forward_backward(fn, scores, cotangent))
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        for name, ms in median.items():
            theirs = median.get(f"entmax:{name}")
            versus = f"{theirs / ms:8.2f}x" if theirs is not None else ""
            print(
                f"{rows:>5}x{keys:<4}  {name:<28} {ms:8.3f} {ms / median['softmax']:10.2f}"
                f" {versus:>9}"
            )
        print()
    print("x entmax = entmax's time / ours (above 1: ours is faster).")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
