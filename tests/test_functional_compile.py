"""The torch.compile path of structattn.functional: same answers as eager, graceful fall-back.

Compiling costs seconds (about 8 s for sparsemax with a warm inductor cache, 20 s cold), so
only the exact maps are compiled here, sparsemax always and entmax15 under the ``slow`` marker;
everything else runs eager in test_functional.py.  Two shapes go through one dynamic-shape
compilation.
"""

import pytest
import torch

from structattn import functional
from structattn.functional import entmax15, sparsemax

torch.set_num_threads(1)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setattr(functional, "COMPILE", True)
    monkeypatch.setattr(functional, "COMPILE_MIN_NUMEL", 0)


@pytest.mark.parametrize(
    "fn",
    [sparsemax, pytest.param(entmax15, marks=pytest.mark.slow)],
    ids=["sparsemax", "entmax15"],
)
def test_compiled_kernels_match_eager_forward_and_backward(compiled, monkeypatch, fn):
    results = []
    for shape in [(33, 17), (5, 300)]:
        scores = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
        mask = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) > 0.2
        mask[:, 0] = True
        cotangent = torch.randn(*shape)
        for use_compile in (True, False):
            monkeypatch.setattr(functional, "COMPILE", use_compile)
            leaf = scores.clone().requires_grad_()
            probs = fn(leaf, mask=mask)
            probs.backward(cotangent)
            results.append((probs.detach(), leaf.grad))
    for (compiled_probs, compiled_grad), (eager_probs, eager_grad) in zip(
        results[::2], results[1::2], strict=True
    ):
        torch.testing.assert_close(compiled_probs, eager_probs, atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=0)
    for kernel in (functional._sparsemax_kernel, functional._entmax15_kernel):
        assert not kernel.failed_devices


def test_small_inputs_run_eager_without_compiling(monkeypatch):
    monkeypatch.setattr(functional, "COMPILE", True)

    def forbidden_compile(fn, **kwargs):
        raise AssertionError("compiled a small input")

    monkeypatch.setattr(torch, "compile", forbidden_compile)
    kernel = functional._MaybeCompiled(functional._sparsemax_kernel.fn)
    scores = torch.randn(4, 9)
    kernel(scores, torch.full((4, 1), -1.0), 3)
    assert kernel.compiled is None


def test_a_size_hint_compiles_the_leftover_rows_of_a_large_input(monkeypatch):
    # The rows entmax_bisect's first call leaves unproven are few, but they are part of a
    # large input: running them eager cost 0.17 ms a call against 0.05 ms compiled.
    monkeypatch.setattr(functional, "COMPILE", True)
    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    kernel = functional._MaybeCompiled(functional._sparsemax_kernel.fn)
    scores = torch.randn(4, 9)
    kernel(scores, torch.full((4, 1), -1.0), 3, size_hint=functional.COMPILE_MIN_NUMEL)
    assert compiled == [kernel.fn] and kernel.compiled is not None


@pytest.mark.parametrize("fails_at", ["compile", "call"])
def test_compile_failure_falls_back_to_eager_with_one_warning(compiled, monkeypatch, fails_at):
    def broken_compile(fn, **kwargs):
        def raise_at_call(*args):
            raise RuntimeError("no C compiler")

        if fails_at == "compile":
            raise RuntimeError("no C compiler")
        return raise_at_call

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = functional._MaybeCompiled(functional._sparsemax_kernel.fn)
    scores = torch.randn(4, 9)
    start = torch.full((4, 1), -1.0)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        probs, _, exact = kernel(scores, start, 3)
    assert kernel.failed_devices == {"cpu"}
    expected, _, _ = functional._sparsemax_kernel.fn(scores, start, 3)
    torch.testing.assert_close(probs, expected)
    probs_again, _, _ = kernel(scores, start, 3)  # no second warning: eager from now on
    torch.testing.assert_close(probs_again, expected)


@pytest.mark.slow
def test_compiled_entmax_bisect_matches_eager_with_a_learned_alpha(compiled, monkeypatch):
    # Rows at alpha 1 (softmax), dense, sparse and above 2, with gradients for scores and alpha.
    scores = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)) * 2
    mask = torch.rand(8, 40, generator=torch.Generator().manual_seed(4)) > 0.2
    mask[:, 0] = True
    alphas = torch.tensor([1.0, 1.00001, 1.3, 1.5, 1.7, 2.0, 2.5, 4.0]).unsqueeze(-1)
    cotangent = torch.randn(8, 40, generator=torch.Generator().manual_seed(5))
    results = []
    for use_compile in (True, False):
        monkeypatch.setattr(functional, "COMPILE", use_compile)
        leaf, alpha = scores.clone().requires_grad_(), alphas.clone().requires_grad_()
        probs = functional.entmax_bisect(leaf, alpha, mask=mask)
        probs.backward(cotangent)
        results.append((probs.detach(), leaf.grad, alpha.grad))
    for compiled_value, eager_value in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(compiled_value, eager_value, atol=1e-5, rtol=1e-4)
    for kernel in (
        functional._bisect_start, functional._bisect_kernel, functional._bisect_probs,
        functional._bisect_backward_with_alpha,
    ):
        assert not kernel.failed_devices
