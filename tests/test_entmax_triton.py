"""The fused Triton kernel of ``entmax_bisect``, run by Triton's CPU interpreter.

The interpreter must be chosen before Triton is first imported (``triton.language``'s own
reductions are built for one mode at import).  Run alone, this module imports Triton in
interpreter mode and runs its tests here; in a larger run where Triton was already imported
compiled (``torch.compile`` imports it), :func:`test_interpreter_tests_in_fresh_process`
runs this file again in a fresh process instead.  On a CUDA machine the compiled kernel is
tested by ``tests/test_gpu.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Triton reads the variable at import and again lazily while launching, so it stays set.
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import structattn as sa  # noqa: E402
from structattn import _triton_entmax as T  # noqa: E402
from structattn import functional as F  # noqa: E402


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.max, InterpretedFunction)


INTERPRETING = _interpreting()
interpreted = pytest.mark.skipif(
    not INTERPRETING,
    reason="Triton was imported compiled; test_interpreter_tests_in_fresh_process runs these",
)


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(),
                    reason="runs only where this process cannot interpret Triton, without CUDA")
def test_interpreter_tests_in_fresh_process():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" in done.stdout  # this test skips there


@pytest.fixture
def triton_on_cpu(route_entmax_to_triton):
    """Route CPU float32 inputs of ``entmax_bisect`` through the kernel, counting calls."""
    return route_entmax_to_triton(("cuda", "cpu"))


def _scores_and_mask(rows: int, keys: int, scale: float, seed: int):
    """Float32 scores and a mask whose rows keep 1 to ``keys`` valid keys."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(rows, keys, generator=gen) * scale).float()
    kept = torch.randint(1, keys + 1, (rows, 1), generator=gen)
    order = torch.rand(rows, keys, generator=gen).argsort(-1)
    mask = order < kept
    mask[0] = True  # one dense row
    return scores, mask


# Float32 against float64; above alpha = 2 the float32 threshold limits the keys next to it
# (p = gap^(1 / (alpha - 1)) is steep there).
_TOLERANCE = {1.01: 5e-7, 1.3: 5e-7, 1.7: 5e-7, 2.5: 1e-6, 4.0: 5e-5}


@interpreted
@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.7, 2.5, 4.0])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_matches_float64_general_path_with_masks(triton_on_cpu, alpha, scale):
    scores, mask = _scores_and_mask(12, 600, scale, seed=int(alpha * 100 + scale))
    found = sa.entmax_bisect(scores, alpha, mask=mask)
    assert triton_on_cpu, "the Triton path was not taken"
    expected = F.entmax_bisect(scores.double(), alpha, mask=mask)
    assert found.dtype == torch.float32
    assert (found[~mask] == 0).all()
    assert torch.allclose(found.double(), expected, atol=_TOLERANCE[alpha], rtol=0)
    assert torch.allclose(found.double().sum(-1), torch.ones(12, dtype=torch.float64), atol=1e-6)


@interpreted
@pytest.mark.parametrize("keys", [1, 2, 3, 17, 100])
def test_short_rows_and_per_row_alpha_with_softmax_rows(triton_on_cpu, keys):
    gen = torch.Generator().manual_seed(keys)
    scores = torch.randn(2, 6, keys, generator=gen) * 5
    alpha = torch.tensor([1.0, 1.01, 1.3, 1.5, 1.7, 2.5]).reshape(1, 6, 1).expand(2, 6, 1)
    found = sa.entmax_bisect(scores, alpha)
    assert triton_on_cpu
    expected = F.entmax_bisect(scores.double(), alpha.double())
    assert torch.allclose(found.double(), expected, atol=5e-6, rtol=0)
    # alpha = 1 rows are softmax.
    assert torch.allclose(found[:, 0].double(), torch.softmax(scores[:, 0].double(), -1),
                          atol=1e-6, rtol=0)


@interpreted
@pytest.mark.parametrize("keys", [5000, T.MAX_KEYS])
def test_longest_rows(triton_on_cpu, keys):
    gen = torch.Generator().manual_seed(keys)
    scores = torch.randn(2, keys, generator=gen) * 3
    alpha = torch.tensor([[1.3], [2.5]])
    found = sa.entmax_bisect(scores, alpha)
    assert triton_on_cpu
    expected = F.entmax_bisect(scores.double(), alpha.double())
    assert torch.allclose(found.double(), expected, atol=5e-6, rtol=0)


@interpreted
def test_other_dim_broadcast_mask_and_half_precision(triton_on_cpu):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 40, 5, generator=gen) * 4
    mask = (torch.rand(3, 40, 1, generator=gen) > 0.3)
    mask[:, 0] = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        found = sa.entmax_bisect(scores.to(dtype), 1.3, dim=1, mask=mask)
        expected = F.entmax_bisect(scores.to(dtype).double(), 1.3, dim=1, mask=mask)
        assert found.dtype == dtype
        assert (found.float() * ~mask == 0).all()
        atol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(found.double(), expected, atol=atol, rtol=0)
    assert len(triton_on_cpu) == 3


@interpreted
@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.7, 2.5])
def test_gradients_match_float64_general_path(triton_on_cpu, alpha):
    scores, mask = _scores_and_mask(8, 50, 3.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    weights = torch.randn(8, 50, generator=gen)
    alphas = torch.full((8, 1), alpha)
    alphas[1::2] = 1.0 + (alpha - 1.0) * torch.rand(4, 1, generator=gen)

    def grads(z, a):
        z = z.clone().requires_grad_(True)
        a = a.clone().requires_grad_(True)
        (sa.entmax_bisect(z, a, mask=mask) * weights.to(z.dtype)).sum().backward()
        return z.grad, a.grad

    grad_z, grad_alpha = grads(scores, alphas)
    assert len(triton_on_cpu) == 1
    ref_z, ref_alpha = grads(scores.double(), alphas.double())
    assert len(triton_on_cpu) == 1  # float64 takes the general path
    assert (grad_z[~mask] == 0).all()
    assert torch.allclose(grad_z.double(), ref_z, atol=5e-5 * ref_z.abs().max().item(), rtol=0)
    assert torch.allclose(grad_alpha.double(), ref_alpha, rtol=1e-3,
                          atol=1e-3 * ref_alpha.abs().max().item() + 1e-7)


@interpreted
def test_second_derivatives_through_the_kernel_match_float64(triton_on_cpu):
    scores, mask = _scores_and_mask(8, 50, 3.0, seed=9)
    gen = torch.Generator().manual_seed(10)
    weights = torch.randn(8, 50, generator=gen)
    alphas = 1.1 + torch.rand(8, 1, generator=gen)

    def hessian_vector(z, a):
        z = z.clone().requires_grad_(True)
        a = a.clone().requires_grad_(True)
        loss = (sa.entmax_bisect(z, a, mask=mask) * weights.to(z.dtype)).sum()
        grad_z, grad_a = torch.autograd.grad(loss, (z, a), create_graph=True)
        return torch.autograd.grad((grad_z * weights.to(z.dtype)).sum() + grad_a.sum(), (z, a))

    got = hessian_vector(scores, alphas)
    assert len(triton_on_cpu) == 1
    for value, expected in zip(got, hessian_vector(scores.double(), alphas.double()),
                               strict=True):
        scale = expected.abs().max().item()
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-4 * scale)


@interpreted
def test_scores_gradient_only_and_alpha_gradient_only(triton_on_cpu):
    scores, mask = _scores_and_mask(4, 30, 2.0, seed=11)
    alphas = torch.full((4, 1), 1.4)
    z = scores.clone().requires_grad_(True)
    sa.entmax_bisect(z, 1.4, mask=mask)[:, :3].sum().backward()
    z64 = scores.double().requires_grad_(True)
    F.entmax_bisect(z64, 1.4, mask=mask)[:, :3].sum().backward()
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-5, rtol=0)
    a = alphas.clone().requires_grad_(True)
    sa.entmax_bisect(scores, a, mask=mask)[:, :3].sum().backward()
    a64 = alphas.double().requires_grad_(True)
    F.entmax_bisect(scores.double(), a64, mask=mask)[:, :3].sum().backward()
    assert torch.allclose(a.grad.double(), a64.grad, rtol=1e-3, atol=1e-6)
    assert len(triton_on_cpu) == 2


@interpreted
def test_fully_masked_row_without_validation_is_zero(triton_on_cpu):
    scores = torch.randn(3, 9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1] = False
    pyro.enable_validation(False)
    found = sa.entmax_bisect(scores, 1.7, mask=mask)
    assert triton_on_cpu
    assert (found[1] == 0).all()
    assert torch.allclose(found[[0, 2]].sum(-1), torch.ones(2), atol=1e-6)


@interpreted
def test_more_passes_change_nothing():
    """The fixed pass counts have converged: many more passes move no probability."""
    scores, mask = _scores_and_mask(6, 300, 10.0, seed=5)
    z = scores.masked_fill(~mask, float("-inf"))
    alpha = torch.tensor([1.0, 1.01, 1.3, 1.7, 2.0, 2.5]).reshape(6, 1)
    probs, shift, slack, tau = T.entmax_bisect_rows(z, alpha)
    many, _, _, many_tau = T.entmax_bisect_rows(z, alpha, bisect_steps=40, refine_steps=40)
    assert torch.allclose(probs, many, atol=3e-7, rtol=0)
    assert torch.allclose(tau, many_tau, atol=1e-6, rtol=0)
    assert torch.equal(shift, z.amax(-1, keepdim=True))
    assert torch.equal(slack, (alpha - 1.0).double())


def test_dispatch_conditions(monkeypatch):
    monkeypatch.setattr(F, "TRITON_DEVICES", ("cuda", "cpu"))
    z = torch.randn(2, 10)
    assert F._use_triton(z, None)
    assert not F._use_triton(z, 1e-4)
    assert not F._use_triton(z.double(), None)
    assert not F._use_triton(torch.randn(2, T.MAX_KEYS + 1), None)
    monkeypatch.setenv("STRUCTATTN_TRITON", "0")
    assert not F._use_triton(z, None)
    monkeypatch.setattr(F, "TRITON_DEVICES", ("cuda",))
    monkeypatch.delenv("STRUCTATTN_TRITON")
    assert not F._use_triton(z, None)


def test_validation_unchanged_on_the_triton_path(triton_on_cpu):
    with pytest.raises(ValueError, match="alpha"):
        sa.entmax_bisect(torch.randn(2, 5), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        sa.entmax_bisect(torch.randn(2, 5), torch.full((2, 1), 0.9))
    with pytest.raises(ValueError, match="scores"):
        sa.entmax_bisect(torch.tensor([[1.0, float("nan")]]), 1.3)
    with pytest.raises(ValueError, match="mask"):
        sa.entmax_bisect(torch.randn(2, 5), 1.3, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert not triton_on_cpu
    # No rows: nothing to launch.
    assert sa.entmax_bisect(torch.randn(0, 3, 5), 1.3).shape == (0, 3, 5)
    assert len(triton_on_cpu) == 1


def test_rows_function_rejects_bad_shapes():
    with pytest.raises(ValueError, match="keys"):
        T.entmax_bisect_rows(torch.randn(2, T.MAX_KEYS + 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="alpha"):
        T.entmax_bisect_rows(torch.randn(2, 4), torch.ones(3, 1))
