"""The inner-loss Hessian products and the sharpness diagnostic against closed forms."""

import torch
from torch import nn

from distmaml.meta import MAML, TaskBatch
from distmaml.meta.hessian import inner_hessian, top_eigenvalue
from distmaml.tasks.sine import mse


def quadratic_tasks(num_tasks=3, points=12, dim=5, proximal=0.0):
    """Linear regression without bias: MSE(Xw, y) has Hessian 2 X^T X / points for every w (plus
    lam I with the proximal term lam/2 |w - phi|^2)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_tasks, points, dim, generator=generator, dtype=torch.float64)
    x[1] *= 3.0  # tasks of very different sharpness
    y = torch.randn(num_tasks, points, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    # The query set is not read by the inner loss: the support set stands in for it.
    return MAML(model, mse, proximal=proximal), dict(model.named_parameters()), TaskBatch(x, y, x, y)


def support_hessians(tasks: TaskBatch) -> torch.Tensor:
    x = tasks.support_x
    return 2 * x.transpose(1, 2) @ x / x.shape[1]


def test_top_eigenvalue_matches_the_closed_form_of_a_quadratic():
    problem, params, tasks = quadratic_tasks()
    estimate = top_eigenvalue(problem, params, tasks, iterations=200)
    exact = torch.linalg.eigvalsh(support_hessians(tasks)).max(-1).values
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=0)
    assert estimate[1] > 5 * estimate[0]  # each task gets its own value
    # The proximal term lam/2 |w - phi|^2 adds lam to every eigenvalue of the inner Hessian.
    proximal, params, tasks = quadratic_tasks(proximal=0.7)
    torch.testing.assert_close(top_eigenvalue(proximal, params, tasks, iterations=200), exact + 0.7, rtol=1e-9,
                               atol=0)


def test_hessian_vector_products_are_each_tasks_own():
    problem, params, tasks = quadratic_tasks()
    phi = {name: value.detach().expand(3, *value.shape).clone() for name, value in params.items()}
    hessian = inner_hessian(problem, phi, params, tasks)
    p = {"weight": torch.randn(3, 1, 5, dtype=torch.float64)}
    products = hessian.hvp(p)["weight"]
    for i in range(3):
        expected = support_hessians(tasks)[i] @ p["weight"][i, 0]
        torch.testing.assert_close(products[i, 0], expected, rtol=1e-12, atol=1e-12)
    # ...and the gradients they differentiate are each task's own: H_i w - 2/n X_i^T y_i.
    x, y = tasks.support_x, tasks.support_y
    gradients = (support_hessians(tasks) @ params["weight"].detach()[0] - 2 * (x.transpose(1, 2) @ y)[..., 0]
                 / x.shape[1])
    torch.testing.assert_close(hessian.grads["weight"][:, 0], gradients, rtol=1e-12, atol=1e-12)
    # The inner loss does not read phi: the mixed product is zero.
    assert torch.equal(hessian.mixed(p)["weight"], torch.zeros_like(params["weight"]))


def test_mixed_product_of_the_proximal_term_is_minus_lam_summed_over_tasks():
    """With lam/2 |w - phi|^2 in the inner loss, d_phi grad_w L_in = -lam I: what implicit
    differentiation turns into iMAML's lam (H + lam I)^-1."""
    lam = 0.7
    problem, params, tasks = quadratic_tasks(proximal=lam)
    weights = {name: value.detach().expand(3, *value.shape) + 0.1 for name, value in params.items()}
    hessian = inner_hessian(problem, weights, params, tasks)
    v = {"weight": torch.randn(3, 1, 5, dtype=torch.float64)}
    torch.testing.assert_close(hessian.mixed(v)["weight"], -lam * v["weight"].sum(0), rtol=1e-12, atol=1e-14)
    products = hessian.hvp(v)["weight"]
    for i in range(3):
        expected = (support_hessians(tasks)[i] + lam * torch.eye(5, dtype=torch.float64)) @ v["weight"][i, 0]
        torch.testing.assert_close(products[i, 0], expected, rtol=1e-12, atol=1e-12)


def test_a_tasks_estimate_does_not_depend_on_the_other_tasks_in_its_batch():
    """World-size invariance of the logged sharpness: a shard's estimate is the slice of the whole."""
    problem, params, tasks = quadratic_tasks(num_tasks=4)
    whole = top_eigenvalue(problem, params, tasks, iterations=5)
    shard = TaskBatch(*(t[2:] for t in tasks))
    torch.testing.assert_close(top_eigenvalue(problem, params, shard, iterations=5), whole[2:], rtol=1e-14, atol=0)
