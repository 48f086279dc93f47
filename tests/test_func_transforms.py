"""torch.func transforms over the simplex maps: vmap, grad, jacrev and jacrev of jacrev give
what the same computation gives without them; forward mode is refused, not wrong.

Each map's autograd Function folds a vmap batch into more rows (the maps work row by row);
under a transform, the checks of values (NaN scores, alpha's range), which Python cannot
branch on under vmap, are skipped.
"""

import pytest
import torch

import structattn as sa

torch.set_num_threads(1)

MASK = torch.tensor([True, True, False, True, True, True])
MAPS = {
    "softmax": sa.masked_softmax,
    "sparsemax": sa.sparsemax,
    "entmax15": sa.entmax15,
    "entmax_bisect 1.3": lambda z, **kw: sa.entmax_bisect(z, 1.3, **kw),
    "entmax_bisect 2.5": lambda z, **kw: sa.entmax_bisect(z, 2.5, **kw),
}


def _rows(dtype=torch.float64, seed=0):
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_equals_the_loop_with_and_without_a_mask(name, dtype):
    fn, rows = MAPS[name], _rows(dtype)
    torch.testing.assert_close(torch.func.vmap(fn)(rows), torch.stack([fn(r) for r in rows]))
    masked = torch.func.vmap(lambda r: fn(r, mask=MASK))(rows)
    torch.testing.assert_close(masked, torch.stack([fn(r, mask=MASK) for r in rows]))
    assert (masked[:, 2] == 0).all()


@pytest.mark.parametrize("name", list(MAPS))
def test_jacobians_and_hessians_by_reverse_mode_equal_autograd(name):
    fn, row = MAPS[name], _rows()[0]
    weights = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def weighted(r):
        return (fn(r) * weights).sum()

    torch.testing.assert_close(torch.func.jacrev(fn)(row),
                               torch.autograd.functional.jacobian(fn, row))
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(weighted))(row),
                               torch.autograd.functional.hessian(weighted, row))
    per_sample = torch.func.vmap(torch.func.grad(weighted))(_rows())
    loop = torch.stack([torch.autograd.functional.jacobian(weighted, r) for r in _rows()])
    torch.testing.assert_close(per_sample, loop)


def test_per_sample_alphas_under_vmap_and_grad():
    rows = _rows()
    alphas = torch.tensor([1.2, 1.6, 2.3, 1.0001], dtype=torch.float64)

    def fn(row, alpha):
        return sa.entmax_bisect(row, alpha.reshape(1))

    torch.testing.assert_close(torch.func.vmap(fn)(rows, alphas),
                               torch.stack([fn(r, a) for r, a in zip(rows, alphas, strict=True)]))
    weights = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    by_grad = torch.func.vmap(torch.func.grad(lambda a, r: (fn(r, a) * weights).sum()))(
        alphas, rows)
    for index, (row, alpha) in enumerate(zip(rows, alphas, strict=True)):
        leaf = alpha.clone().requires_grad_()
        (fn(row, leaf) * weights).sum().backward()
        torch.testing.assert_close(by_grad[index], leaf.grad)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax_bisect 1.3"])
def test_forward_mode_is_refused_rather_than_wrong(name):
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jacfwd(MAPS[name])(_rows()[0])


@pytest.mark.parametrize("name", list(MAPS))
def test_vmap_over_a_batch_in_the_last_dimension(name):
    """The batch may sit anywhere in the physical tensor: (keys, batch) mapped over dim 1."""
    fn, columns = MAPS[name], _rows().t()  # (keys, batch)
    mapped = torch.func.vmap(fn, in_dims=1, out_dims=1)(columns)
    torch.testing.assert_close(mapped, fn(columns.t()).t())
