"""Support-loss Hessians of every task at once: Hessian-vector products and the top eigenvalue.

Task i's support gradient depends on its own weights alone, so one vector-Jacobian product of the
stacked (vmapped) gradients with stacked vectors gives every task its own H_i p_i. The implicit
meta-gradient solves with these products; `top_eigenvalue` measures sharpness with them.

Why sharpness matters: plain gradient descent at step size alpha on a quadratic with top Hessian
eigenvalue mu is stable only while alpha * mu < 2. Meta-training can sharpen the support loss at
theta past that limit (README, "sine protocol"), and then adaptation with more inner steps than
training used blows up on some tasks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import grad, vmap

from distmaml.meta.functional import LossFn, Params, detached, functional_forward


def task_dot(a: Params, b: Params) -> torch.Tensor:
    """[n] inner product of each task's slice of two batched parameter dicts."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)


def per_task(scale: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[n] -> broadcastable against a batched parameter [n, ...]."""
    return scale.reshape(-1, *([1] * (value.dim() - 1)))


def support_hvp(model: nn.Module, phi: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                loss_fn: LossFn) -> tuple[Params, Callable[[Params], Params]]:
    """(support gradients, p -> H_i p_i) of every task at its weights phi_i (task dimension first).

    The products differentiate one retained graph of the batched support gradient (reverse over
    reverse), so each costs one backward pass, not a rebuild of the gradient.
    """
    points = {name: value.detach().requires_grad_() for name, value in phi.items()}

    def support_loss(point: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_forward(model, point, task_x), task_y)

    with torch.enable_grad():
        grads = vmap(grad(support_loss))(points, support_x, support_y)
    names, inputs = list(points), list(points.values())
    outputs = [grads[name] for name in names]

    def hvp(p: Params) -> Params:
        products = torch.autograd.grad(outputs, inputs, grad_outputs=[p[name] for name in names],
                                       retain_graph=True, allow_unused=True)
        return {name: torch.zeros_like(p[name]) if h is None else h for name, h in zip(names, products)}

    return detached(grads), hvp


def top_eigenvalue(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                   loss_fn: LossFn, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """[n] each task's support-loss Hessian eigenvalue of largest magnitude, at shared weights `params`.

    Power iteration on Hessian-vector products from a fixed random start (`seed`), all tasks in
    lock step; the estimate is the Rayleigh quotient v.Hv of the last unit vector. It converges to
    the dominant eigenvalue (with its sign) at the rate |mu_2 / mu_1| per iteration. Every task
    starts from the same vector, so a task's estimate does not depend on which tasks share its
    batch (a shard's values are the slice of the whole batch's).
    """
    num_tasks = support_x.shape[0]
    phi = {name: value.detach().expand(num_tasks, *value.shape) for name, value in params.items()}
    _, hvp = support_hvp(model, phi, support_x, support_y, loss_fn)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = {name: torch.randn(value.shape[1:], generator=generator, dtype=value.dtype).to(value.device)
              .expand_as(value) for name, value in phi.items()}
    estimate = torch.zeros(num_tasks, dtype=support_x.dtype, device=support_x.device)
    for _ in range(iterations):
        norm = task_dot(vector, vector).sqrt().clamp_min(torch.finfo(estimate.dtype).tiny)
        vector = {name: value / per_task(norm, value) for name, value in vector.items()}
        product = hvp(vector)
        estimate = task_dot(vector, product)
        vector = product
    return estimate.detach()
