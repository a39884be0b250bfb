"""The sharpness diagnostic against closed forms."""

import torch
from torch import nn

from distmaml.meta.hessian import support_hvp, top_eigenvalue
from distmaml.tasks.sine import mse


def quadratic_tasks(num_tasks=3, points=12, dim=5):
    """Linear regression without bias: MSE(Xw, y) has Hessian 2 X^T X / points for every w."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_tasks, points, dim, generator=generator, dtype=torch.float64)
    x[1] *= 3.0  # tasks of very different sharpness
    y = torch.randn(num_tasks, points, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    return model, dict(model.named_parameters()), x, y


def test_top_eigenvalue_matches_the_closed_form_of_a_quadratic():
    model, params, x, y = quadratic_tasks()
    estimate = top_eigenvalue(model, params, x, y, mse, iterations=200)
    exact = torch.stack([torch.linalg.eigvalsh(2 * xi.T @ xi / xi.shape[0]).max() for xi in x])
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=0)
    assert estimate[1] > 5 * estimate[0]  # each task gets its own value


def test_hessian_vector_products_are_each_tasks_own():
    model, params, x, y = quadratic_tasks()
    phi = {name: value.detach().expand(3, *value.shape).clone() for name, value in params.items()}
    _, hvp = support_hvp(model, phi, x, y, mse)
    p = {"weight": torch.randn(3, 1, 5, dtype=torch.float64)}
    products = hvp(p)["weight"]
    for i in range(3):
        expected = (2 * x[i].T @ x[i] / x.shape[1]) @ p["weight"][i, 0]
        torch.testing.assert_close(products[i, 0], expected, rtol=1e-12, atol=1e-12)


def test_a_tasks_estimate_does_not_depend_on_the_other_tasks_in_its_batch():
    """World-size invariance of the logged sharpness: a shard's estimate is the slice of the whole."""
    model, params, x, y = quadratic_tasks(num_tasks=4)
    whole = top_eigenvalue(model, params, x, y, mse, iterations=5)
    torch.testing.assert_close(top_eigenvalue(model, params, x[2:], y[2:], mse, iterations=5), whole[2:],
                               rtol=1e-14, atol=0)
