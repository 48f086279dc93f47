"""Structured attention's training paths: structattn against torch-struct, one cell at a time.

Every method's memory is measured in a fresh Python process with one thread, so that its peak
is its own: the growth of the process's peak resident set size (``ru_maxrss``, which counts
torch's CPU allocations; ``tracemalloc`` does not see them) over its state just before the
call (after a tiny call of the same code). Times are the fastest of up to ``--repeats``
calls (fewer when one call takes long) after one warm-up call: on a shared machine the
minimum is the statistic least disturbed by other processes. All methods get the same potentials
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

``time x`` is structattn's time over torch-struct's, measured in the same process with the
calls interleaved (below 1: structattn is faster); ``mem x`` likewise for peak memory.

    python benchmarks/structured.py                       # the full grid (several minutes)
    python benchmarks/structured.py --structures chain    # the chain grid only
    python benchmarks/structured.py --quick               # a small grid, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
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
        "--repeats", type=int, default=15, help="most timed calls per cell; the fastest is reported"
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
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="chain lengths N (default: the grid)"
    )
    parser.add_argument(
        "--states", type=int, nargs="+", default=None, help="chain states C (default: the grid)"
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


def _callable(spec: dict, method: str, small: bool = False):
    """The function one cell times; ``small``: the same code path at a tiny size (warm-up)."""
    n = 4 if small else spec["n"]
    if spec["structure"] == "chain":
        return _chain_callable(method, spec["path"], spec["batch"], n, spec["c"])
    return _tree_callable(spec["structure"], method, spec["batch"], n)


def run_cell(spec: dict) -> dict:
    """Measure one cell in this process.

    ``spec["measure"] == "memory"``: growth of the peak RSS over one call of one method (after
    a tiny call of the same code, so that lazily loaded code is not counted), in MiB.
    ``"time"``: every method of ``spec["methods"]`` called in turn, round after round, so that
    machine load falls on all alike; the fastest call of each, in ms.
    """
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if spec["measure"] == "memory":
        _callable(spec, spec["method"], small=True)()
        fn = _callable(spec, spec["method"])  # the inputs are not the method's memory
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mib": (peak - before) / 1024}
    functions = {method: _callable(spec, method) for method in spec["methods"]}
    start = time.perf_counter()
    for fn in functions.values():
        fn()
    first = time.perf_counter() - start
    # long cells get fewer rounds (at least one): about 20 s per cell
    rounds = max(1, min(spec["repeats"], int(20.0 / max(first, 1e-6))))
    times: dict[str, list[float]] = {method: [] for method in functions}
    for _ in range(rounds):
        for method, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[method].append(time.perf_counter() - start)
    # the minimum: on a shared machine every other statistic mostly measures the neighbours
    return {method: 1000 * min(ts) for method, ts in times.items()}


# ------------------------------------------------------------------------------- driver
def _grid(args) -> list[dict]:
    cells = []
    if "chain" in args.structures:
        lengths = args.lengths or ([32, 128] if args.quick else [32, 128, 512, 2048])
        states = args.states or ([2, 8] if args.quick else [2, 8, 32])
        for n in lengths:
            for c in states:
                for path in CHAIN_PATHS:
                    cells.append(dict(structure="chain", path=path, batch=16, n=n, c=c))
    for structure in ("projective", "nonprojective"):
        if structure in args.structures:
            for n in [16, 32] if args.quick else [16, 32, 64, 128]:
                cells.append(dict(structure=structure, path="marginals", batch=8, n=n, c=None))
    return cells


def _skip_reason(cell: dict, method: str, max_peer_gib: float) -> str | None:
    if cell["structure"] == "chain" and method == "torch-struct":
        # its scan builds (B, N, C, C, C) float32 intermediates, several per level
        gib = cell["batch"] * cell["n"] * cell["c"] ** 3 * 4 / 2**30
        if gib > max_peer_gib:
            return f"skipped: its scan needs > {gib:.0f} GiB"
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


def _measure(cell: dict, args) -> dict:
    """Times (one process, methods interleaved) and peak memory (one process per method)."""
    methods = CHAIN_METHODS if cell["structure"] == "chain" else TREE_METHODS
    result: dict = {"skipped": {}}
    runnable = []
    for method in methods:
        reason = _skip_reason(cell, method, args.max_peer_gib)
        if reason:
            result["skipped"][method] = reason
        else:
            runnable.append(method)
    timing = _run_in_subprocess({**cell, "measure": "time", "methods": runnable}, args.timeout)
    for method in runnable:
        entry = {"ms": timing[method]} if method in timing else {"error": timing.get("error")}
        memory = _run_in_subprocess({**cell, "measure": "memory", "method": method}, args.timeout)
        entry.update(memory)
        result[method] = entry
    return result


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cell is not None:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    repeats = 3 if args.quick else args.repeats
    header = (
        f"{'structure':<14}{'path':<15}{'B':>3}{'N':>6}{'C':>4}"
        f"{'ours ms':>10}{'peer ms':>10}{'time x':>8}{'ours MiB':>10}{'peer MiB':>10}{'mem x':>7}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for cell in _grid(args):
        cell["repeats"] = repeats
        measured = _measure(cell, args)
        ours, peer = measured.get("structattn", {}), measured.get("torch-struct", {})
        row = f"{cell['structure']:<14}{cell['path']:<15}{cell['batch']:>3}{cell['n']:>6}"
        row += f"{cell['c'] or '-':>4}"
        row += f"{ours.get('ms', float('nan')):>10.2f}{peer.get('ms', float('nan')):>10.2f}"
        if "ms" in ours and "ms" in peer:
            measured["time_ratio"] = ours["ms"] / peer["ms"]
        row += f"{measured.get('time_ratio', float('nan')):>8.2f}"
        row += f"{ours.get('peak_mib', float('nan')):>10.1f}"
        row += f"{peer.get('peak_mib', float('nan')):>10.1f}"
        if "peak_mib" in ours and "peak_mib" in peer:
            # growth under 1 MiB is allocator noise: the ratio counts at least 1 MiB
            measured["memory_ratio"] = max(ours["peak_mib"], 1.0) / max(peer["peak_mib"], 1.0)
        row += f"{measured.get('memory_ratio', float('nan')):>7.2f}"
        notes = [f"{m}: {r}" for m, r in measured["skipped"].items()]
        notes += [
            f"{m}: {e['error']}"
            for m, e in measured.items()
            if isinstance(e, dict) and e.get("error")
        ]
        print(row + ("  " + "; ".join(notes) if notes else ""), flush=True)
        results.append({**cell, **measured})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
