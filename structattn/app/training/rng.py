"""Every random stream the trainer saves and restores: Python ``random``, NumPy's global
stream, torch CPU and CUDA.

States are stored as tensors and plain Python values, so the weights-only loader reads them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "check_rng_state", "restore_rng_state", "seed_everything"]

# The global NumPy stream is legacy API, but user code may draw from it, so it is seeded,
# saved and restored like the others.

_MT_WORDS = 624  # state words of the Mersenne Twister used by both `random` and NumPy


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global stream and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's random states: ``{"python", "numpy", "torch", "cuda"}``."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def check_rng_state(state: Any) -> str | None:
    """Why ``state`` is not a state written by :func:`capture_rng_state`, or ``None``."""
    if not isinstance(state, Mapping):
        return f"expected a dict, got {type(state).__name__}"
    missing = sorted({"python", "numpy", "torch"} - set(state))
    if missing:
        return f"missing {', '.join(missing)}"
    python = state["python"]
    if not (
        isinstance(python, Sequence)
        and len(python) == 3
        and isinstance(python[0], int)
        and (python[2] is None or isinstance(python[2], float))
        and isinstance(python[1], Sequence)
        and len(python[1]) == _MT_WORDS + 1
        and all(isinstance(word, int) and not isinstance(word, bool) for word in python[1])
    ):
        return "the Python 'random' state is not (version, 625 ints, gauss)"
    numpy = state["numpy"]
    if not isinstance(numpy, Mapping) or not {
        "keys", "position", "has_gauss", "cached_gaussian"
    } <= set(numpy):
        return "the NumPy state lacks keys, position, has_gauss or cached_gaussian"
    keys = numpy["keys"]
    if not (isinstance(keys, torch.Tensor) and keys.shape == (_MT_WORDS,)):
        return "the NumPy state's keys are not 624 integers"
    if (
        not isinstance(numpy["position"], int)
        or not 0 <= numpy["position"] <= _MT_WORDS
        or not isinstance(numpy["has_gauss"], int)
        or not isinstance(numpy["cached_gaussian"], float)
    ):
        return "the NumPy state's position, has_gauss or cached_gaussian has the wrong type"
    generator = state["torch"]
    if not (isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
            and generator.shape == torch.get_rng_state().shape):
        return "the torch state is not a byte tensor of the generator's size"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, Sequence) or not all(
        isinstance(item, torch.Tensor) and item.dtype == torch.uint8 for item in cuda
    ):
        return "the CUDA states are not a list of byte tensors"
    return None


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set every random stream from a :func:`capture_rng_state` value (check it first)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    # A run resumed on a machine with another GPU count keeps fresh CUDA streams.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
