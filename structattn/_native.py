"""The CPU kernel of ``entmax_bisect`` for float32 rows: built from ``_native_entmax.cpp`` on
first use, cached, and called through :mod:`ctypes`.

The C++ file is compiled once per machine (``-O3 -march=native``, a few seconds) into a cache
directory outside the source tree (``$STRUCTATTN_CACHE_DIR``, else
``$XDG_CACHE_HOME/structattn``, else ``~/.cache/structattn``; a temporary directory if that is
not writable), named by a hash of the source, the compiler, its flags and the CPU, and written
atomically (compile to a temporary name, then rename), so that concurrent processes and stale
builds never see a half-written library.  Without a C++ compiler, or when the build or the
load fails, :func:`library` warns once and returns None, and ``entmax_bisect`` keeps its
general (compiled-PyTorch) path; the environment variable ``STRUCTATTN_NATIVE=0`` turns the
kernel off.

The kernel takes ``alpha - 1`` in ``[MIN_SLACK, 1]`` (alpha in [1.1, 2]); rows outside that
range stay on the general path.  Large inputs are split by rows across
``torch.get_num_threads()`` threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MIN_SLACK", "MAX_SLACK", "Forward", "available", "backward", "forward", "in_range",
           "library", "self_check"]

#: The range of ``alpha - 1`` the kernel handles (its powers lose accuracy as alpha -> 1).
MIN_SLACK = 0.1
MAX_SLACK = 1.0
#: The C++ source, shipped with the package.
SOURCE = Path(__file__).with_name("_native_entmax.cpp")
#: Compiler flags; no -ffast-math (power() rounds with an exact add-and-subtract trick).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
         "-Wno-psabi")
#: Inputs with at least this many elements per thread are split across threads.
_SPLIT_NUMEL = 1 << 15

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0


def in_range(slack: float | Tensor) -> bool | Tensor:
    """Whether ``slack = alpha - 1`` (a number, or elementwise for a tensor) is in the range
    the kernel takes."""
    return (slack >= MIN_SLACK) & (slack <= MAX_SLACK)


def enabled() -> bool:
    """Whether the environment allows the kernel (``STRUCTATTN_NATIVE`` not 0/false/no/off)."""
    value = os.environ.get("STRUCTATTN_NATIVE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built libraries go (created on demand)."""
    explicit = os.environ.get("STRUCTATTN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "structattn"


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on another CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(flags: tuple[str, ...] = FLAGS, directory: Path | None = None) -> Path:
    """Compile the kernel with ``flags`` (cached by source, compiler, flags and CPU) and return
    the library's path.  Raises ``RuntimeError`` with the compiler's message when it fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(flags).encode(),
                    _cpu_signature().encode(), platform.machine().encode()])
    ).hexdigest()[:20]
    directory = cache_dir() if directory is None else directory
    target = directory / f"entmax-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        directory = Path(tempfile.gettempdir()) / f"structattn-{user}"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / target.name
        if target.exists():
            return target
    handle, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.part", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{result.stderr}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its two functions' signatures."""
    lib = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.structattn_entmax_bisect_f32.restype = ctypes.c_int64
    lib.structattn_entmax_bisect_f32.argtypes = [
        pointer, pointer, size, pointer, pointer, pointer, pointer, size, size, ctypes.c_int32,
        pointer]
    lib.structattn_entmax_bisect_backward_f32.restype = None
    lib.structattn_entmax_bisect_backward_f32.argtypes = [
        pointer, pointer, pointer, pointer, pointer, size, pointer, pointer, pointer, size, size]
    return lib


@functools.lru_cache(maxsize=1)
def _default_library() -> ctypes.CDLL | None:
    try:
        return load(build())
    except Exception as error:  # no compiler, a failed build or load: the general path
        warnings.warn(
            f"structattn: the CPU entmax_bisect kernel is unavailable ({error}); "
            "entmax_bisect uses its general path. Set STRUCTATTN_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=3)
        return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None when disabled or unavailable."""
    if not enabled():
        return None
    with _lock:
        return _default_library()


def available() -> bool:
    """Whether :func:`forward` and :func:`backward` can run here."""
    return library() is not None


def _chunks(rows: int, numel: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads()
    parts = max(1, min(threads, rows, numel // _SPLIT_NUMEL))
    bounds = [rows * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _run(calls: list) -> None:
    """Run the per-chunk calls, across threads when there are several."""
    global _pool, _pool_size, _pool_pid
    if len(calls) == 1:
        calls[0]()
        return
    with _lock:
        # A forked child inherits the pool object but not its threads: it makes its own.
        if _pool is None or _pool_size < len(calls) or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="structattn")
            _pool_size, _pool_pid = len(calls), os.getpid()
        pool = _pool
    for future in [pool.submit(call) for call in calls]:
        future.result()


def _plain(tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``tensor`` contiguous (and of ``dtype``), without a call when it already is: the
    kernel's fixed cost per call is mostly such calls."""
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _rows(z: Tensor, slack: Tensor, **same_shape: Tensor
          ) -> tuple[Tensor, Tensor, int, int, int]:
    """Check the kernel's inputs (it reads raw memory: a wrong dtype or shape would read out of
    bounds) and return ``(z, slack, slack_stride, rows, keys)`` as it takes them (the sizes as
    ints, also while ``torch.jit.trace`` records the autograd Function around the kernel, which
    makes sizes tensors)."""
    if z.dim() != 2 or z.dtype != torch.float32 or not z.is_cpu:
        raise ValueError(f"z must be (rows, keys) float32 on the CPU, got {tuple(z.shape)} "
                         f"{z.dtype} on {z.device.type}")
    for name, tensor in same_shape.items():
        if tensor.shape != z.shape or not tensor.is_cpu:
            raise ValueError(f"{name} must be a CPU tensor of z's shape {tuple(z.shape)}, got "
                             f"{tuple(tensor.shape)} on {tensor.device.type}")
    rows, keys = (int(size) for size in z.shape)
    slack = _plain(slack.reshape(-1), torch.float64)
    values = int(slack.numel())
    if values not in (1, rows):
        raise ValueError(f"slack must hold one value or one per row ({rows}), got {values}")
    return _plain(z), slack, int(values > 1), rows, keys


def _in_chunks(call: Callable[[int, int], None], rows: int, numel: int) -> None:
    """``call(start, stop)`` over row ranges, across threads for large inputs."""
    if numel < 2 * _SPLIT_NUMEL or torch.get_num_threads() == 1:
        call(0, rows)  # (one chunk: no list, partial or pool)
        return
    _run([functools.partial(call, a, b) for a, b in _chunks(rows, numel)])


class Forward(NamedTuple):
    """:func:`forward`'s results."""

    probs: Tensor  #: (rows, keys)
    shift: Tensor  #: (rows, 1) float32, the row maximum
    tau: Tensor  #: (rows, 1) float64, the threshold on x = (z - shift)(alpha - 1)
    unconverged: int  #: rows not converged within max_passes
    nonfinite: int  #: rows holding NaN or +-inf scores


def forward(z: Tensor, slack: Tensor, max_passes: int, lib: ctypes.CDLL | None = None
            ) -> Forward:
    """alpha-entmax of rows ``z: (rows, keys)`` float32 with ``slack = alpha - 1: (rows, 1)``
    (or one value for every row) in ``[MIN_SLACK, MAX_SLACK]``.

    The row maximum and the threshold it returns are what the general path's backward reads
    too; rows with non-finite scores are counted (the caller's validation raises on them).
    """
    lib = library() if lib is None else lib
    z, slack, slack_stride, rows, keys = _rows(z, slack)
    probs = torch.empty_like(z)
    shift = torch.empty(rows, 1, dtype=z.dtype)
    tau = torch.empty(rows, 1, dtype=torch.float64)
    counts = []
    # Row r starts at base + r * (bytes per row): every tensor here is contiguous.
    z_at, slack_at, probs_at = z.data_ptr(), slack.data_ptr(), probs.data_ptr()
    shift_at, tau_at, row_bytes = shift.data_ptr(), tau.data_ptr(), 4 * keys

    def call(start: int, stop: int) -> None:
        nonfinite = ctypes.c_int64(0)
        unconverged = lib.structattn_entmax_bisect_f32(
            z_at + start * row_bytes, slack_at + 8 * start * slack_stride, slack_stride,
            probs_at + start * row_bytes, shift_at + 4 * start, tau_at + 8 * start, None,
            stop - start, keys, max_passes, ctypes.byref(nonfinite))
        counts.append((unconverged, nonfinite.value))

    _in_chunks(call, rows, rows * keys)
    return Forward(probs, shift, tau, sum(c[0] for c in counts), sum(c[1] for c in counts))


def backward(z: Tensor, probs: Tensor, shift: Tensor, slack: Tensor, tau: Tensor, grad: Tensor,
             alpha_grad: bool, lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor | None]:
    """The gradients of :func:`forward`'s output ``probs: (rows, keys)`` against
    ``grad: (rows, keys)``: with respect to the scores ``(rows, keys)``, and (if
    ``alpha_grad``) to each row's alpha as ``(rows, 1)`` float32."""
    lib = library() if lib is None else lib
    z, slack, slack_stride, rows, keys = _rows(z, slack, probs=probs, grad=grad)
    probs, grad = _plain(probs, torch.float32), _plain(grad, torch.float32)
    shift, tau = _plain(shift, torch.float32), _plain(tau, torch.float64)
    if shift.numel() != rows or tau.numel() != rows:
        raise ValueError(f"shift and tau must hold one value per row ({rows}), got "
                         f"{shift.numel()} and {tau.numel()}")
    grad_z = torch.empty_like(z)
    grad_alpha = torch.empty(rows, 1, dtype=z.dtype) if alpha_grad else None
    # Row r starts at base + r * (bytes per row): every tensor here is contiguous.
    z_at, probs_at, grad_at, out_at = z.data_ptr(), probs.data_ptr(), grad.data_ptr(), \
        grad_z.data_ptr()
    shift_at, slack_at, tau_at = shift.data_ptr(), slack.data_ptr(), tau.data_ptr()
    alpha_at = None if grad_alpha is None else grad_alpha.data_ptr()
    row_bytes = 4 * keys

    def call(start: int, stop: int) -> None:
        lib.structattn_entmax_bisect_backward_f32(
            z_at + start * row_bytes, probs_at + start * row_bytes, grad_at + start * row_bytes,
            shift_at + 4 * start, slack_at + 8 * start * slack_stride, slack_stride,
            tau_at + 8 * start, out_at + start * row_bytes,
            None if alpha_at is None else alpha_at + 4 * start, stop - start, keys)

    _in_chunks(call, rows, rows * keys)
    return grad_z, grad_alpha


def self_check(path: Path, rows: int = 64, keys: int = 100, alpha: float = 1.3) -> float:
    """Run the library at ``path`` on random rows and return the largest deviation of its
    output from the definition of alpha-entmax, evaluated in float64 at the threshold it
    returned: ``p = [(z - max)(alpha - 1) - tau]_+ ^ (1 / (alpha - 1))`` summing to one."""
    scores = torch.randn(rows, keys)
    slack = alpha - 1.0
    out = forward(scores, torch.full((1, 1), slack, dtype=torch.float64), 50, load(path))
    shifted = (scores.double() - out.shift.double()) * slack
    exact = (shifted - out.tau).clamp_min(0.0) ** (1.0 / slack)
    return max(float((out.probs.double() - exact).abs().max()),
               float((exact.sum(-1) - 1.0).abs().max()))


if __name__ == "__main__":  # python -m structattn._native: build now, say where, self-check
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Build (or find in the cache) the CPU kernel of entmax_bisect and check its "
                    "output on random rows against the definition of alpha-entmax in float64; "
                    "exits with status 1 if it deviates by more than 1e-5.")
    parser.parse_args()
    path = build()
    print(f"kernel: {path}")
    deviation = self_check(path)
    print(f"largest deviation from the definition in float64: {deviation:.1e}")
    sys.exit(0 if deviation <= 1e-5 else 1)
