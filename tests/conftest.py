import os

import pyro
import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)

# CI replays the same examples on every run (a red CI is then a real regression, never a new
# draw); local runs keep exploring fresh examples, and a failure prints its reproduction.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.enable_validation(True)


@pytest.fixture
def route_entmax_to_triton(monkeypatch):
    """``route(devices) -> calls``: send ``entmax_bisect`` on those device types through the
    fused Triton kernel and record the shape of each kernel call in ``calls``."""
    def route(devices: tuple[str, ...]) -> list:
        from structattn import _triton_entmax, functional

        monkeypatch.setattr(functional, "TRITON_DEVICES", devices)
        calls = []
        original = _triton_entmax.entmax_bisect_rows

        def counting(*args, **kwargs):
            calls.append(args[0].shape)
            return original(*args, **kwargs)

        monkeypatch.setattr(_triton_entmax, "entmax_bisect_rows", counting)
        return calls

    return route


@pytest.fixture
def general_entmax_path(monkeypatch):
    """Keep ``entmax_bisect`` on its general (compiled-PyTorch) path: without the CPU kernel
    of :mod:`structattn._native`, which otherwise takes float32 CPU rows."""
    from structattn import _native

    monkeypatch.setattr(_native, "library", lambda: None)
