"""Multi-head attention: ``sa.nn.MultiheadAttention`` against ``torch.nn.MultiheadAttention``.

One run measures, at each (batch, length), torch's layer and ours with soft softmax heads
(same weights), then ours with sparsemax, entmax15 and learned-alpha entmax heads, forward and
backward and forward only (no weights requested, self-attention, batch first), interleaved in
the same loop so that load from other processes hits all of them alike.  It prints medians,
each layer's ratio to torch's and to our soft layer, and the peak memory that one training
step allocates (CUDA: the allocator's peak; CPU: the autograd graph's saved tensors).

    python benchmarks/attention.py            # (8, 512) and (32, 128), d_model 512, 8 heads
    python benchmarks/attention.py --quick    # a few repeats, for a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from structattn.nn.multihead import MultiheadAttention

DEFAULT_SHAPES = ((8, 512), (32, 128))
LAYERS = ("torch", "soft", "sparsemax", "entmax15", "entmax-heads")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in DEFAULT_SHAPES),
                        help="comma-separated BATCHxLENGTH (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="number of heads (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (default 2)")
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 warm-up, small shapes")
    args = parser.parse_args()
    for name, value in (("--repeats", args.repeats), ("--d-model", args.d_model),
                        ("--heads", args.heads), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.quick:
        args.repeats, args.warmup, args.shapes = 2, 1, "2x64,4x32"
    try:
        args.shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 8x512,32x128, got {args.shapes!r}")
    args.layers = args.layers.split(",")
    unknown = sorted(set(args.layers) - set(LAYERS))
    if unknown:
        parser.error(f"unknown --layers {unknown}; choose from {LAYERS}")
    return args


def build(name: str, d_model: int, heads: int, reference: torch.nn.Module, device: str):
    """The layer called ``name``, with the reference's projection weights."""
    if name == "torch":
        return reference
    normalizer = "softmax" if name == "soft" else name
    layer = MultiheadAttention(d_model, heads, batch_first=True, normalizer=normalizer)
    layer.load_state_dict(reference.state_dict(), strict=False)
    return layer.to(device)


def step_fn(layer, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def step() -> None:
        if backward:
            out, _ = layer(x, x, x, need_weights=False)
            out.sum().backward()
        else:
            with torch.no_grad():
                layer(x, x, x, need_weights=False)
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(layer, x: torch.Tensor, device: str) -> float:
    """MiB held for one training step: the allocator's peak on CUDA, saved tensors on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, _ = layer(x, x, x, need_weights=False)
        out.sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, _ = layer(x, x, x, need_weights=False)
    out.sum().backward()
    return sum(seen.values()) / 2**20


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"device {args.device}, threads {args.threads}, d_model {args.d_model}, heads "
          f"{args.heads}, repeats {args.repeats}; medians in ms, ratios in the same run")
    header = f"{'B x L':>9} {'layer':>13} {'fwd+bwd':>9} {'fwd':>8} {'/torch':>7} " \
             f"{'/torch fwd':>10} {'/soft':>6} {'/soft fwd':>9} {'MiB':>7}"
    print(header)
    for batch, length in args.shapes:
        reference = torch.nn.MultiheadAttention(args.d_model, args.heads, batch_first=True)
        reference = reference.to(args.device)
        layers = {name: build(name, args.d_model, args.heads, reference, args.device)
                  for name in args.layers}
        x = torch.randn(batch, length, args.d_model, device=args.device, requires_grad=True)
        times: dict[tuple[str, bool], list[float]] = {
            (name, backward): [] for name in layers for backward in (True, False)}
        for repeat in range(args.warmup + args.repeats):
            for (name, backward), record in times.items():
                step = step_fn(layers[name], x, backward)
                sync(args.device)
                start = time.perf_counter()
                step()
                sync(args.device)
                if repeat >= args.warmup:
                    record.append(1e3 * (time.perf_counter() - start))
        median = {key: statistics.median(value) for key, value in times.items()}
        for name, layer in layers.items():
            full, fwd = median[(name, True)], median[(name, False)]

            def ratio(base: str, backward: bool, value: float, median=median) -> str:
                key = (base, backward)
                return f"{value / median[key]:.2f}" if key in median else "-"

            print(f"{batch:>4} x {length:<4}{name:>13} {full:9.2f} {fwd:8.2f} "
                  f"{ratio('torch', True, full):>7} {ratio('torch', False, fwd):>10} "
                  f"{ratio('soft', True, full):>6} {ratio('soft', False, fwd):>9} "
                  f"{peak_memory(layer, x, args.device):7.1f}")


if __name__ == "__main__":
    main()
