"""Structured marginals: structattn against torch-struct and Pyro's DiscreteHMM.

Every cell (structure, method, sizes) runs in a fresh Python process with one thread, so that
its peak memory (growth of ``ru_maxrss`` over the process's state just before the first call)
is its own. Times are medians of ``--repeats`` calls after one warm-up call. All methods get the
same potentials (float32, standard normal) and compute the same marginals:

* linear chain, ``(B, N-1, C, C)``: structattn ``LinearChainCRF(phi).marginals`` (explicit
  forward-backward); torch-struct ``LinearChainCRF`` (log-space parallel scan + autograd);
  Pyro ``DiscreteHMM`` fed the exact CRF factorisation (every edge potential split into a
  row-normalised transition and the row's log-normaliser, carried by the previous step's
  emission and the initial distribution) and differentiated by autograd;
* dependency trees, ``(B, N, N)``, single root: structattn ``ProjectiveDependencyCRF`` /
  ``NonProjectiveDependencyCRF`` against torch-struct's ``DependencyCRF(multiroot=False)`` /
  ``NonProjectiveDependencyCRF``.

The ratio column is the method's time over structattn's time in the same run.

    python benchmarks/structured.py            # the full grid (a few minutes)
    python benchmarks/structured.py --quick    # a small grid, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CHAIN_METHODS = ("structattn", "torch-struct", "pyro-DiscreteHMM")
TREE_METHODS = ("structattn", "torch-struct")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of structured marginals: structattn vs torch-struct "
        "and Pyro's DiscreteHMM (one fresh process per cell)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="small grid and 3 repeats (a smoke test)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per cell; the median is reported"
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
        default=3.0,
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
def _chain_callable(method: str, batch: int, nodes: int, states: int):
    import torch

    phi = torch.randn(batch, nodes - 1, states, states, generator=torch.Generator().manual_seed(0))
    if method == "structattn":
        from structattn.distributions.chain import LinearChainCRF

        return lambda: LinearChainCRF(phi).marginals
    if method == "torch-struct":
        import torch_struct

        def run():
            leaf = phi.clone().requires_grad_(True)
            return torch_struct.LinearChainCRF(leaf * 1.0).marginals

        return run
    import pyro.distributions as dist

    def run():
        leaf = phi.clone().requires_grad_(True)
        transition = leaf.transpose(-1, -2)  # [b, n, previous, next]
        normalizer = torch.logsumexp(transition, -1)  # [b, n, previous]
        emission = torch.cat([normalizer[:, 1:], torch.zeros_like(normalizer[:, :1])], 1)
        hmm = dist.DiscreteHMM(
            normalizer[:, 0],
            transition - normalizer.unsqueeze(-1),
            dist.Delta(torch.zeros_like(emission), log_density=emission),
        )
        log_z = hmm.log_prob(torch.zeros(batch, nodes - 1)) + torch.logsumexp(normalizer[:, 0], -1)
        return torch.autograd.grad(log_z.sum(), leaf)[0]

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
        fn = _chain_callable(spec["method"], spec["batch"], spec["n"], spec["c"])
    else:
        fn = _tree_callable(spec["structure"], spec["method"], spec["batch"], spec["n"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(spec["repeats"]):
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
                for method in CHAIN_METHODS:
                    cells.append(dict(structure="chain", method=method, batch=16, n=n, c=c))
    for structure in ("projective", "nonprojective"):
        if structure in args.structures:
            for n in [16, 32] if args.quick else [16, 32, 64, 128]:
                for method in TREE_METHODS:
                    cells.append(dict(structure=structure, method=method, batch=8, n=n, c=None))
    return cells


def _skip_reason(cell: dict, max_peer_gib: float) -> str | None:
    if cell["structure"] == "chain" and cell["method"] == "torch-struct":
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
    header = f"{'structure':<14}{'B':>3}{'N':>6}{'C':>4}  {'method':<18}{'ms':>10}{'+MiB':>8}"
    print(header + f"{'x ours':>9}")
    print("-" * (len(header) + 9))
    ours_ms: dict[tuple, float] = {}
    for cell in _grid(args):
        cell["repeats"] = repeats
        reason = _skip_reason(cell, args.max_peer_gib)
        result = {"error": reason} if reason else _run_in_subprocess(cell, args.timeout)
        key = (cell["structure"], cell["n"], cell["c"])
        if cell["method"] == "structattn" and "ms" in result:
            ours_ms[key] = result["ms"]
        row = f"{cell['structure']:<14}{cell['batch']:>3}{cell['n']:>6}{cell['c'] or '-':>4}  "
        row += f"{cell['method']:<18}"
        if "ms" in result:
            ratio = result["ms"] / ours_ms[key] if key in ours_ms else float("nan")
            result["ratio_to_structattn"] = ratio
            row += f"{result['ms']:>10.2f}{result['peak_mib']:>8.1f}{ratio:>9.2f}"
        else:
            row += f"  {result['error']}"
        print(row, flush=True)
        results.append({**cell, **result})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
