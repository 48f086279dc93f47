"""The CPU kernel of entmax_bisect (structattn._native): against float64 bisection, its
gradients against float64 autograd of the general path, its build (cache, atomicity, a
portable build without -march=native, no compiler) and its routing from entmax_bisect."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_entmax_bisect import assert_float32_gradients_within_1e3_of_float64
from test_functional import random_scores
from test_functional import reference_entmax as reference

from structattn import _native, functional
from structattn.functional import entmax_bisect

FLOAT32_EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(
    _native._compiler() is None, reason="no C++ compiler: the kernel cannot be built here"
)


@pytest.fixture
def native_calls(monkeypatch):
    """The number of rows each call of the kernel's forward received, in a list."""
    assert _native.library() is not None, "a C++ compiler is present, so the kernel must build"
    calls = []
    original = _native.forward

    def counting(z, slack, max_passes, lib=None):
        calls.append(z.shape[0])
        return original(z, slack, max_passes, lib)

    monkeypatch.setattr(_native, "forward", counting)
    return calls


def assert_close_to_reference(probs: torch.Tensor, expected: torch.Tensor) -> None:
    # Five float32 eps, the general path's own bound (test_entmax_bisect.py).
    assert (probs.double() - expected).abs().max() <= 5 * FLOAT32_EPS
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(probs.shape[:-1],
                               dtype=torch.float64), atol=4 * FLOAT32_EPS, rtol=0)
    # The support: every key the reference gives more than 1e-6 is in it.
    assert bool(((probs > 0) | (expected <= 1e-6)).all())


@pytest.mark.parametrize("alpha", [2.0 - 2e-16, 1.99999, 1.9999])
@pytest.mark.parametrize("keys", [65, 300, 2000])
def test_a_key_crossing_the_threshold_in_the_last_step_is_resolved_next_to_alpha_2(alpha, keys):
    """As alpha -> 2 a key's power is about its gap, so a key that crosses the threshold in
    the last (second-order) step shifts the sum by about the step; such rows resume their
    passes.  Hypothesis found the case: alpha = 2 - 2e-16, 65 keys at scale 0.1 was off by
    8.7e-6 (15 float32 eps) with the sum still 1."""
    for seed in range(40):
        scores = random_scores(3, keys, scale=0.1, seed=seed, dtype=torch.float32)
        assert_close_to_reference(entmax_bisect(scores, alpha), reference(scores, alpha))


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.7, 1.999])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("keys", [1, 2, 15, 16, 17, 64, 100, 129, 513])
def test_matches_float64_bisection(alpha, scale, keys, native_calls):
    scores = random_scores(37, keys, scale=scale, seed=keys, dtype=torch.float32)
    probs = entmax_bisect(scores, alpha)
    assert native_calls == [37]
    assert_close_to_reference(probs, reference(scores, alpha))


@pytest.mark.parametrize("keys", [64, 4096])
def test_long_and_short_rows_at_the_benchmark_shapes(keys, native_calls):
    scores = random_scores(8, keys, seed=3, dtype=torch.float32)
    alpha = 1.2 + 0.6 * torch.rand(8, 1, generator=torch.Generator().manual_seed(1))
    probs = entmax_bisect(scores, alpha)
    assert native_calls == [8]
    assert_close_to_reference(probs, reference(scores, alpha.double()))


def test_per_row_alphas_inside_and_outside_the_kernel_range(native_calls):
    scores = random_scores(6, 40, seed=5, dtype=torch.float32)
    alpha = torch.tensor([[1.3], [1.0001], [1.7], [3.0], [1.05], [2.0]])
    probs = entmax_bisect(scores, alpha)
    # Rows 0, 2 and 5 are the kernel's; the others take the general path.
    assert native_calls == [3]
    for row in range(6):
        expected = reference(scores[row:row + 1], float(alpha[row]))
        assert (probs[row].double() - expected[0]).abs().max() <= 5 * FLOAT32_EPS


def test_masked_keys_get_exactly_zero_and_ties_are_kept(native_calls):
    scores = torch.tensor([[0.5, 0.5, 0.5, -1.0, 2.0, 2.0]] * 3, dtype=torch.float32)
    mask = torch.tensor([[True, True, True, True, False, False],
                         [True, False, True, False, True, True],
                         [True] * 6])
    probs = entmax_bisect(scores, 1.3, mask=mask)
    assert bool((probs[~mask] == 0).all())
    masked = scores.masked_fill(~mask, float("-inf"))
    assert_close_to_reference(probs, reference(masked, 1.3))
    # Equal scores get equal probabilities.
    assert probs[0, 0] == probs[0, 1] == probs[0, 2]
    assert native_calls


def test_a_row_of_minus_infinity_gives_zeros_not_nan():
    z = torch.full((3, 20), float("-inf"))
    z[1, 4] = 0.0
    probs, shift, tau, unconverged, nonfinite = _native.forward(
        z, torch.tensor([[0.5]], dtype=torch.float64), 50)
    assert unconverged == 0 and nonfinite == 3  # every row holds -inf
    assert bool((probs[0] == 0).all()) and bool((probs[2] == 0).all())
    assert probs[1, 4] == 1.0 and float(probs[1].sum()) == 1.0
    assert bool(torch.isfinite(shift).all()) and bool(torch.isfinite(tau).all())


def test_one_pass_still_gives_a_distribution():
    z = random_scores(50, 300, seed=2, dtype=torch.float32)
    probs, _, _, unconverged, _ = _native.forward(z, torch.tensor([[0.3]], dtype=torch.float64),
                                                  1)
    assert unconverged > 0
    assert bool((probs >= 0).all()) and bool(torch.isfinite(probs).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(50), atol=1e-6, rtol=0)


@pytest.mark.parametrize("keys", [17, 64, 700])
def test_gradients_match_float64_autograd_of_the_general_path(keys, native_calls):
    rows = 24
    generator = torch.Generator().manual_seed(keys)
    base = 1.15 + 0.8 * torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    assert_float32_gradients_within_1e3_of_float64(
        random_scores(rows, keys, scale=3.0, seed=7), base, random_scores(rows, keys, seed=8))
    assert native_calls == [rows]  # float32 only: float64 is the general path's


def test_scores_gradient_alone_and_alpha_gradient_alone(native_calls):
    scores = random_scores(10, 33, seed=4, dtype=torch.float32)
    alpha = torch.full((10, 1), 1.4)
    cotangent = random_scores(10, 33, seed=6, dtype=torch.float32)
    leaf = scores.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(entmax_bisect(leaf, alpha), leaf, cotangent)
    learned = alpha.clone().requires_grad_(True)
    (grad_alpha,) = torch.autograd.grad(entmax_bisect(scores, learned), learned, cotangent)
    leaf64 = scores.double().requires_grad_(True)
    (exact_z,) = torch.autograd.grad(entmax_bisect(leaf64, alpha.double()), leaf64,
                                     cotangent.double())
    a64 = alpha.double().requires_grad_(True)
    (exact_alpha,) = torch.autograd.grad(entmax_bisect(scores.double(), a64), a64,
                                         cotangent.double())
    assert (grad_z.double() - exact_z.double()).abs().max() <= 1e-3 * exact_z.abs().max()
    assert (grad_alpha.double() - exact_alpha).abs().max() <= 1e-3 * exact_alpha.abs().max()
    assert grad_z.dtype == torch.float32 and grad_alpha.shape == (10, 1)
    # Masked keys get exactly zero gradient.
    mask = torch.ones(10, 33, dtype=torch.bool)
    mask[:, :5] = False
    (masked_grad,) = torch.autograd.grad(entmax_bisect(leaf, 1.4, mask=mask), leaf, cotangent)
    assert bool((masked_grad[:, :5] == 0).all())


def test_many_threads_give_the_same_answer_as_one(native_calls):
    scores = random_scores(512, 300, seed=9, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        single = entmax_bisect(scores, 1.3)
        torch.set_num_threads(3)
        split = entmax_bisect(scores, 1.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, split)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    keys=st.integers(1, 90),
    alpha=st.floats(1.1, 2.0).filter(lambda a: a not in (1.5, 2.0)),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 10_000),
)
def test_property_any_shape_alpha_and_scale(rows, keys, alpha, scale, seed):
    scores = random_scores(rows, keys, scale=scale, seed=seed, dtype=torch.float32)
    assert functional._native_covers(scores, alpha, None)
    assert_close_to_reference(entmax_bisect(scores, alpha), reference(scores, alpha))


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def test_a_portable_build_without_march_native_gives_the_same_answers(tmp_path):
    """Without -march=native the AVX-512 compress/expand code is compiled out: the generic
    packing (and, on x86, 16-lane vectors split into narrower ones) must agree."""
    flags = tuple(flag for flag in _native.FLAGS if flag != "-march=native")
    lib = _native.load(_native.build(flags, directory=tmp_path))
    scores = random_scores(29, 77, scale=3.0, seed=11, dtype=torch.float32)
    slack = torch.full((29, 1), 0.35, dtype=torch.float64)
    probs, shift, tau, unconverged, _ = _native.forward(scores, slack, 50, lib)
    assert unconverged == 0
    assert_close_to_reference(probs, reference(scores, 1.35))
    cotangent = random_scores(29, 77, seed=12, dtype=torch.float32)
    portable = _native.backward(scores, probs, shift, slack, tau, cotangent, True, lib)
    native = _native.backward(scores, probs, shift, slack, tau, cotangent, True)
    torch.testing.assert_close(portable[0], native[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(portable[1], native[1], atol=1e-6, rtol=1e-4)


def test_builds_are_cached_and_written_atomically(tmp_path):
    paths = []
    errors = []

    def build() -> None:
        try:
            paths.append(_native.build(directory=tmp_path))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no partial files left
    before = paths[0].stat().st_mtime_ns
    assert _native.build(directory=tmp_path) == paths[0]
    assert paths[0].stat().st_mtime_ns == before  # cached, not rebuilt


def test_a_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(_native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed to build broken.cpp"):
        _native.build(directory=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*.part"))


def test_without_a_compiler_entmax_bisect_warns_once_and_takes_the_general_path(monkeypatch):
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    _native._default_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="kernel is unavailable"):
            assert _native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scores = random_scores(4, 30, seed=1, dtype=torch.float32)
            probs = entmax_bisect(scores, 1.3)
        assert (probs.double() - reference(scores, 1.3)).abs().max() <= 5 * FLOAT32_EPS
    finally:
        _native._default_library.cache_clear()


def test_the_environment_switch_turns_the_kernel_off(monkeypatch, native_calls):
    monkeypatch.setenv("STRUCTATTN_NATIVE", "0")
    assert _native.library() is None
    entmax_bisect(random_scores(4, 30, seed=1, dtype=torch.float32), 1.3)
    assert native_calls == []


@pytest.mark.parametrize("target", ["native", "portable"])
def test_the_kernel_under_address_and_undefined_behaviour_sanitizers(target, tmp_path):
    """tests/native/check_kernel.cpp runs the kernel over awkward shapes (row lengths around
    the vector width, masked keys, empty rows, one pass) compiled with -fsanitize: an
    out-of-bounds access, undefined behaviour or a row not summing to 1 fails it."""
    import subprocess
    from pathlib import Path

    harness = Path(__file__).with_name("native") / "check_kernel.cpp"
    binary = tmp_path / "check_kernel"
    flags = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=all", "-Wno-psabi", f'-DSTRUCTATTN_KERNEL="{_native.SOURCE}"']
    if target == "native":
        flags.append("-march=native")
    build = subprocess.run([_native._compiler(), *flags, str(harness), "-o", str(binary)],
                           capture_output=True, text=True, check=False)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"the compiler has no sanitizer runtime: {build.stderr[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused_by_name_on_the_kernel_path(bad, native_calls):
    scores = random_scores(5, 40, seed=3, dtype=torch.float32)
    scores[3, 17] = bad
    with pytest.raises(ValueError, match="scores contains"):
        entmax_bisect(scores, 1.3)
    assert native_calls == [5]  # found by the kernel as it read the scores
    # With a mask the check runs before (masked keys are -inf inside): a bad valid key.
    mask = torch.ones(5, 40, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="scores contains"):
        entmax_bisect(scores, 1.3, mask=mask)
    # A bad score at a masked position is fine.
    mask[3, 17] = False
    assert bool(torch.isfinite(entmax_bisect(scores, 1.3, mask=mask)).all())


def test_a_forked_child_splits_rows_across_its_own_threads(tmp_path):
    """The thread pool is per process: a child forked after the parent used it must not wait
    on the parent's threads (it would hang)."""
    import multiprocessing

    scores = random_scores(512, 300, seed=9, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = entmax_bisect(scores, 1.3)  # creates the pool in this process
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            result = pool.apply_async(_entmax_in_two_threads, (scores,))
            probs = result.get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(probs, expected)


def _entmax_in_two_threads(scores: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    return entmax_bisect(scores, 1.3)


def test_the_module_builds_the_kernel_ahead_of_time_and_checks_it():
    import re
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "structattn._native"], capture_output=True,
                         text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernel: " in run.stdout
    deviation = float(re.search(r"definition in float64: (\S+)", run.stdout).group(1))
    assert deviation <= 5 * FLOAT32_EPS


def test_the_self_check_catches_a_kernel_whose_output_is_off(monkeypatch):
    real = _native.forward

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(probs=out.probs * (1 + 1e-4))

    path = _native.build()
    assert _native.self_check(path) <= 5 * FLOAT32_EPS
    monkeypatch.setattr(_native, "forward", off_by_a_little)
    assert _native.self_check(path) > 1e-5


def test_the_kernel_refuses_inputs_it_would_read_out_of_bounds_by_name():
    z = torch.randn(4, 9)
    slack = torch.tensor([[0.3]], dtype=torch.float64)
    with pytest.raises(ValueError, match="z must be"):
        _native.forward(z.double(), slack, 50)
    with pytest.raises(ValueError, match="z must be"):
        _native.forward(z[0], slack, 50)
    with pytest.raises(ValueError, match="slack must hold"):
        _native.forward(z, torch.full((3, 1), 0.3, dtype=torch.float64), 50)
    probs, shift, tau, *_ = _native.forward(z, slack, 50)
    with pytest.raises(ValueError, match="grad must be"):
        _native.backward(z, probs, shift, slack, tau, torch.ones(4, 8), False)
    with pytest.raises(ValueError, match="shift and tau must hold one value per row"):
        _native.backward(z, probs, shift[:2], slack, tau, torch.ones(4, 9), False)
    # non-contiguous and float64 inputs are taken as the kernel needs them
    grads = _native.backward(z.t().contiguous().t(), probs, shift, slack, tau,
                             torch.ones(9, 4, dtype=torch.float64).t(), True)
    reference_grads = _native.backward(z, probs, shift, slack, tau, torch.ones(4, 9), True)
    torch.testing.assert_close(grads, reference_grads)
    assert _native.in_range(0.3) and not _native.in_range(0.05) and not _native.in_range(1.5)
