"""Second derivatives (``create_graph=True``: Hessian-vector products, gradient penalties,
meta-learning) through the simplex maps, against finite differences of their exact gradient.

The maps' autograd Functions have hand-written backward passes; autograd differentiates those
passes again.  A backward that reads a constant of the forward (the threshold) instead of the
output drops part of the second derivative: entmax_bisect's Hessian was off by 30-150%, and
entmax15's was NaN (the derivative of sqrt(p) at p = 0).
"""

import pytest
import torch

import structattn as sa

torch.set_num_threads(1)


def hessian_matches_differences_of_the_gradient(fn, x, eps=1e-6, atol=1e-7):
    hessian = torch.autograd.functional.hessian(fn, x)
    assert torch.isfinite(hessian).all()

    def gradient(point):
        point = point.clone().requires_grad_()
        return torch.autograd.grad(fn(point), point)[0]

    directions = torch.eye(x.numel(), dtype=x.dtype).reshape(x.numel(), *x.shape)
    differences = torch.stack([(gradient(x + eps * d) - gradient(x - eps * d)) / (2 * eps)
                               for d in directions]).reshape(hessian.shape)
    torch.testing.assert_close(hessian, differences, rtol=1e-5, atol=atol)
    return hessian


MAPS = {
    "softmax": sa.masked_softmax,
    "sparsemax": sa.sparsemax,
    "entmax15": sa.entmax15,
    **{f"entmax_bisect {alpha}": (lambda z, alpha=alpha: sa.entmax_bisect(z, alpha))
       for alpha in (1.05, 1.3, 1.7, 2.5)},
}


@pytest.mark.parametrize("name", list(MAPS))
def test_the_hessian_of_each_map_matches_differences_of_its_gradient(name):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    hessian_matches_differences_of_the_gradient(lambda z: (MAPS[name](z) * weights).sum(),
                                                scores)


def test_the_hessian_in_scores_and_a_learned_alpha_jointly():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    packed = torch.cat([scores, torch.tensor([[1.3], [1.8]], dtype=torch.float64)], -1)
    hessian = hessian_matches_differences_of_the_gradient(
        lambda v: (sa.entmax_bisect(v[:, :6], v[:, 6:]) * weights).sum(), packed)
    assert hessian[:, 6, :, :6].abs().max() > 1e-3  # the mixed alpha-score part is there


def test_the_cpu_kernel_gives_the_float64_hessian_vector_product_in_float32():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(64, 40, generator=generator, dtype=torch.float64)
    weights = torch.randn(64, 40, generator=generator, dtype=torch.float64)
    products = []
    for dtype in (torch.float32, torch.float64):
        x = scores.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad((sa.entmax_bisect(x, 1.3) * weights.to(dtype)).sum(), x,
                                      create_graph=True)
        products.append(torch.autograd.grad((grad * weights.to(dtype)).sum(), x)[0].double())
    torch.testing.assert_close(products[0], products[1], rtol=0, atol=1e-5)


def test_second_derivatives_after_the_kernels_were_compiled_on_a_large_input():
    """Once a kernel is compiled it serves every size; a backward pass that autograd records
    (create_graph=True) must still run eagerly (compiled graphs refuse double backward)."""
    large = torch.randn(300, 100, dtype=torch.float64, requires_grad=True)
    for fn in (sa.entmax15, sa.sparsemax, lambda z: sa.entmax_bisect(z, 1.3)):
        (fn(large) * large.detach()).sum().backward()  # compiles forward and backward kernels
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    for fn in (sa.entmax15, lambda z: sa.entmax_bisect(z, 1.3)):
        hessian_matches_differences_of_the_gradient(lambda z, fn=fn: (fn(z) * weights).sum(),
                                                    scores)
