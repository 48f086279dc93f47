"""Simplex maps on an accelerator: time against ``torch.softmax`` and memory bandwidth against
the card's own copy bandwidth, measured in the same run.

Each map reads its ``(rows, keys)`` scores once and writes its probabilities once, so its
least possible traffic is ``2 * rows * keys * itemsize`` bytes; the achieved bandwidth is that
traffic over the forward time, reported next to the bandwidth of a plain device-to-device copy
of the same tensor (``torch.Tensor.copy_``, counted the same way: bytes read + written).  On a
CPU the same script runs with wall-clock timers (a smoke test; bandwidth is not meaningful
there under load).

    python benchmarks/simplex_bandwidth.py --device cuda
    python benchmarks/simplex_bandwidth.py --device cpu --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from structattn import functional

SHAPES = "4096x64,1024x512,256x4096,65536x1024,16384x4096"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--shapes", default=SHAPES,
                        help="comma-separated ROWSxKEYS (default: %(default)s; the first three "
                             "are benchmarks/simplex_maps.py's, the last two fill the card "
                             "well past its L2 cache)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="score dtype (default float32)")
    parser.add_argument("--alphas", default="1.3,1.7",
                        help="entmax_bisect alphas besides a learned per-row tensor "
                             "(default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats, 1 warm-up, the three small shapes only")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.shapes = 3, 1, "4096x64,1024x512,256x4096"
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        args.shapes = [tuple(int(n) for n in item.split("x")) for item in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 4096x64,1024x512; got {args.shapes!r}")
    args.alphas = [float(a) for a in args.alphas.split(",") if a]
    return args


class Timer:
    """Median seconds of a callable: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)


def maps(alphas: list[float], rows: int, device: torch.device, dtype: torch.dtype
         ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The maps timed, by name; the learned alphas are one per row in [1.2, 1.8]."""
    generator = torch.Generator().manual_seed(1)
    learned = (1.2 + 0.6 * torch.rand(rows, 1, generator=generator)).to(device, dtype)
    learned.requires_grad_(True)
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "softmax": lambda x: torch.softmax(x, -1),
        "sparsemax": functional.sparsemax,
        "entmax15": functional.entmax15,
    }
    for alpha in alphas:
        table[f"entmax_bisect a={alpha:g}"] = (
            lambda x, a=alpha: functional.entmax_bisect(x, a))
    table["entmax_bisect a=learned"] = lambda x: functional.entmax_bisect(x, learned)
    return table


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, args.repeats, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, dtype {args.dtype}, "
          f"repeats {args.repeats}, median times")
    header = (f"{'shape':>11} {'map':<24} {'fwd ms':>9} {'x softmax':>9} {'fwd+bwd ms':>11} "
              f"{'x softmax':>9} {'GB/s':>8} {'x copy':>7}")
    print(header)
    print("-" * len(header))
    for rows, keys in args.shapes:
        scores = torch.randn(rows, keys, device=device, dtype=dtype)
        cotangent = torch.randn_like(scores)
        traffic = 2 * scores.numel() * scores.element_size()
        target = torch.empty_like(scores)
        copy_seconds = timer(lambda s=scores, t=target: t.copy_(s))
        copy_bandwidth = traffic / copy_seconds / 1e9
        print(f"{rows:>5}x{keys:<5} {'copy_':<24} {copy_seconds * 1e3:9.3f} {'':>9} {'':>11} "
              f"{'':>9} {copy_bandwidth:8.0f} {1.0:7.2f}")
        forward: dict[str, float] = {}
        backward: dict[str, float] = {}
        for label, fn in maps(args.alphas, rows, device, dtype).items():
            with torch.no_grad():
                forward[label] = timer(lambda f=fn, s=scores: f(s))
            leaf = scores.detach().requires_grad_(True)
            backward[label] = timer(
                lambda f=fn, x=leaf, c=cotangent: torch.autograd.grad(f(x), x, c))
            bandwidth = traffic / forward[label] / 1e9
            print(f"{rows:>5}x{keys:<5} {label:<24} {forward[label] * 1e3:9.3f} "
                  f"{forward[label] / forward['softmax']:9.2f} {backward[label] * 1e3:11.3f} "
                  f"{backward[label] / backward['softmax']:9.2f} {bandwidth:8.0f} "
                  f"{bandwidth / copy_bandwidth:7.2f}")
        worst = max((backward[k] / backward["softmax"], k) for k in backward
                    if k.startswith("entmax_bisect"))
        print(f"{rows:>5}x{keys:<5} slowest entmax_bisect fwd+bwd: {worst[0]:.2f}x softmax "
              f"({worst[1]}; issue-12 target <= 4)\n")
    print("GB/s: least traffic (scores read once, probabilities written once) / forward time; "
          "x copy: that against copy_ of the same tensor.")


if __name__ == "__main__":
    main()
