"""structattn: attention as a latent alignment in a probabilistic graphical model.

Scores in, an alignment distribution out; how the context is read from it (expectation,
sample, enumeration, structured marginals) is the caller's choice, and every estimator is a
way of training through that choice.

Subpackages and the re-exported names load on first use (PEP 562), so ``import structattn``
and the ``structattn --help`` command stay fast; ``sa.nn``, ``sa.CategoricalAlignment`` and
``from structattn import functional`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_SUBPACKAGES = ("data", "distributions", "functional", "infer", "models", "nn")
#: re-exported name -> the module that defines it
_EXPORTS = {
    **{name: "structattn.distributions" for name in (
        "CategoricalAlignment", "HMMAlignment", "JumpAlignment", "LinearChainCRF",
        "MonotonicAlignment",
        "NonProjectiveDependencyCRF", "ProjectiveDependencyCRF", "RelaxedAlignment",
        "SegmentationAlignment", "SparsemaxAlignment", "segmentation_crf")},
    **{name: "structattn.functional" for name in (
        "entmax15", "entmax_bisect", "masked_softmax", "sparsemax")},
}

__all__ = sorted([*_EXPORTS, *(p for p in _SUBPACKAGES if p != "data")])


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"structattn.{name}")
    elif name in _EXPORTS:
        module = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'structattn' has no attribute {name!r}")
    globals()[name] = module  # later look-ups skip this function
    return module


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})


if TYPE_CHECKING:  # static tools see the eager imports
    from structattn import distributions, functional, infer, models, nn  # noqa: F401
    from structattn.distributions import (  # noqa: F401
        CategoricalAlignment,
        HMMAlignment,
        JumpAlignment,
        LinearChainCRF,
        MonotonicAlignment,
        NonProjectiveDependencyCRF,
        ProjectiveDependencyCRF,
        RelaxedAlignment,
        SegmentationAlignment,
        SparsemaxAlignment,
        segmentation_crf,
    )
    from structattn.functional import entmax15, entmax_bisect, masked_softmax, sparsemax  # noqa: F401
