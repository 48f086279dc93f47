"""Structured attention's training paths: structattn against torch-struct, one cell at a time.

Every cell (structure, path, method, sizes) runs in a fresh Python process with one thread, so
that its peak memory is its own: the growth of the process's peak resident set size
(``ru_maxrss``, which counts torch's CPU allocations; ``tracemalloc`` does not see them) over
its state just before the first call. Times are medians of up to ``--repeats`` calls (fewer
when one call takes long) after one warm-up call. All methods get the same potentials
(float32, standard normal).

* linear chain, ``(B, N-1, C, C)``, two paths, both as training runs them:
  ``marginals``: compute the edge marginals, use them as weights in a loss
  (``(marginals * W).sum()``) and backpropagate through them (structured attention);
  ``log-partition``: compute ``log Z`` and backpropagate (a CRF likelihood).
  structattn ``LinearChainCRF`` against torch-struct ``LinearChainCRF`` (log-space parallel
  scan, autograd, double backward for the marginals path).
* dependency trees, ``(B, N, N)``, single root, marginals (forward only): structattn
  ``ProjectiveDependencyCRF`` / ``NonProjectiveDependencyCRF`` against torch-struct's
  ``DependencyCRF(multiroot=False)`` / ``NonProjectiveDependencyCRF``.

The ratio column is structattn's time over the peer's time in the same run (below 1: we are
faster); ``mem x`` likewise for peak memory.

    python benchmarks/structured.py                       # the full grid (several minutes)
    python benchmarks/structured.py --structures chain    # the chain grid only
    python benchmarks/structured.py --quick               # a small grid, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CHAIN_METHODS = ("structattn", "torch-struct")
CHAIN_PATHS = ("marginals", "log-partition")
TREE_METHODS = ("structattn", "torch-struct")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of structured attention's training paths: "
        "structattn vs torch-struct (one fresh process per cell)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="small grid and 3 repeats (a smoke test)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="most timed calls per cell; the median is reported"
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        default=["chain", "projective", "nonprojective"],
        choices=["chain", "projective", "nonprojective"],
        help="which structures to benchmark",
    )
    parser.add_argument(
        "--max-peer-gib",
        type=float,
        default=2.0,
        help="skip torch-struct chain cells whose (B, N, C, C, C) scan intermediate would "
        "exceed this many GiB",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per cell before giving up"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--cell", default=None, help="internal: run one cell given as JSON and print its result"
    )
    return parser


# ----------------------------------------------------------------------------- one cell
def _chain_callable(method: str, path: str, batch: int, nodes: int, states: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(batch, nodes - 1, states, states, generator=generator)
    weights = torch.randn(batch, nodes - 1, states, states, generator=generator)
    if method == "structattn":
        from structattn.distributions.chain import LinearChainCRF as Chain
    else:
        from torch_struct import LinearChainCRF as Chain

    def run():
        leaf = phi.clone().requires_grad_(True)
        # torch-struct's PyPI release crashes on a leaf tensor, hence the "* 1.0"
        crf = Chain(leaf * 1.0)
        if path == "marginals":
            loss = (crf.marginals * weights).sum()
        else:
            loss = crf.partition.sum()
        loss.backward()
        return leaf.grad

    return run


def _tree_callable(structure: str, method: str, batch: int, words: int):
    import torch

    scores = torch.randn(batch, words, words, generator=torch.Generator().manual_seed(0))
    if method == "structattn":
        from structattn.distributions.tree import (
            NonProjectiveDependencyCRF,
            ProjectiveDependencyCRF,
        )

        cls = ProjectiveDependencyCRF if structure == "projective" else NonProjectiveDependencyCRF
        return lambda: cls(scores).marginals
    import torch_struct

    def run():
        leaf = scores.clone().requires_grad_(True)
        if structure == "projective":
            return torch_struct.DependencyCRF(leaf * 1.0, multiroot=False).marginals
        return torch_struct.NonProjectiveDependencyCRF(leaf * 1.0, multiroot=False).marginals

    return run


def run_cell(spec: dict) -> dict:
    """Time one cell in this process; returns ``{"ms": median, "peak_mib": growth}``."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if spec["structure"] == "chain":
        fn = _chain_callable(spec["method"], spec["path"], spec["batch"], spec["n"], spec["c"])
    else:
        fn = _tree_callable(spec["structure"], spec["method"], spec["batch"], spec["n"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    # long cells get fewer repeats (at least one): about 10 s per cell
    for _ in range(max(1, min(spec["repeats"], int(10.0 / max(first, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "peak_mib": (peak - before) / 1024}


# ------------------------------------------------------------------------------- driver
def _grid(args) -> list[dict]:
    cells = []
    if "chain" in args.structures:
        lengths = [32, 128] if args.quick else [32, 128, 512, 2048]
        states = [2, 8] if args.quick else [2, 8, 32]
        for n in lengths:
            for c in states:
                for path in CHAIN_PATHS:
                    for method in CHAIN_METHODS:
                        cells.append(
                            dict(structure="chain", path=path, method=method, batch=16, n=n, c=c)
                        )
    for structure in ("projective", "nonprojective"):
        if structure in args.structures:
            for n in [16, 32] if args.quick else [16, 32, 64, 128]:
                for method in TREE_METHODS:
                    cells.append(
                        dict(
                            structure=structure,
                            path="marginals",
                            method=method,
                            batch=8,
                            n=n,
                            c=None,
                        )
                    )
    return cells


def _skip_reason(cell: dict, max_peer_gib: float) -> str | None:
    if cell["structure"] == "chain" and cell["method"] == "torch-struct":
        # its scan builds (B, N, C, C, C) float32 intermediates, several per level
        gib = cell["batch"] * cell["n"] * cell["c"] ** 3 * 4 / 2**30
        if gib > max_peer_gib:
            return f"skipped: scan needs ~{gib:.0f} GiB"
    return None


def _run_in_subprocess(cell: dict, timeout: float) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(cell)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cell is not None:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    repeats = 3 if args.quick else args.repeats
    results = []
    header = (
        f"{'structure':<14}{'path':<15}{'B':>3}{'N':>6}{'C':>4}  {'method':<14}"
        f"{'ms':>10}{'+MiB':>9}"
    )
    print(header + f"{'time x':>9}{'mem x':>8}")
    print("-" * (len(header) + 17))
    ours: dict[tuple, dict] = {}
    for cell in _grid(args):
        cell["repeats"] = repeats
        reason = _skip_reason(cell, args.max_peer_gib)
        result = {"error": reason} if reason else _run_in_subprocess(cell, args.timeout)
        key = (cell["structure"], cell["path"], cell["n"], cell["c"])
        if cell["method"] == "structattn" and "ms" in result:
            ours[key] = result
        row = f"{cell['structure']:<14}{cell['path']:<15}{cell['batch']:>3}{cell['n']:>6}"
        row += f"{cell['c'] or '-':>4}  {cell['method']:<14}"
        if "ms" in result:
            row += f"{result['ms']:>10.2f}{result['peak_mib']:>9.1f}"
            if cell["method"] != "structattn" and key in ours:
                result["time_ratio_ours_to_peer"] = ours[key]["ms"] / result["ms"]
                # a growth under 1 MiB is noise; the ratio is taken against at least 1 MiB
                result["memory_ratio_ours_to_peer"] = max(ours[key]["peak_mib"], 1.0) / max(
                    result["peak_mib"], 1.0
                )
                row += f"{result['time_ratio_ours_to_peer']:>9.2f}"
                row += f"{result['memory_ratio_ours_to_peer']:>8.2f}"
        else:
            row += f"  {result['error']}"
        print(row, flush=True)
        results.append({**cell, **result})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
