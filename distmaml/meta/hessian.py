"""Inner-loss Hessians of every task at once: Hessian-vector products, mixed products, the top eigenvalue.

Task i's inner gradient g_i = grad_w inner_loss(w_i, phi, task_i) depends on its own weights alone,
so one vector-Jacobian product of the stacked gradients (distmaml.meta.unrolling.inner_gradients)
with stacked vectors gives every task its own H_i p_i, and one with respect to phi gives sum_i (d_phi g_i)^T v_i: the two products
implicit differentiation needs. `top_eigenvalue` measures sharpness with them.

Why sharpness matters: plain gradient descent at step size alpha on a quadratic with top Hessian
eigenvalue mu is stable only while alpha * mu < 2. Meta-training can sharpen the inner loss at
its start past that limit (docs/results.md, the sine protocol), and then adaptation with more inner
steps than training used blows up on some tasks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from distmaml.meta.functional import Params, Tasks, detached
from distmaml.meta.unrolling import inner_gradients, start_weights


def task_dot(a: Params, b: Params) -> torch.Tensor:
    """[n] inner product of each task's slice of two batched parameter dicts."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)


def per_task(scale: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[n] -> broadcastable against a batched parameter [n, ...]."""
    return scale.reshape(-1, *([1] * (value.dim() - 1)))


class InnerHessian(NamedTuple):
    grads: Params  # [n, ...] inner gradients at the weights, detached
    hvp: Callable[[Params], Params]  # p -> H_i p_i for every task (p batched)
    mixed: Callable[[Params], Params]  # v -> sum_i (d_phi g_i)^T v_i, shaped like phi


def inner_hessian(problem: Any, weights: Params, phi: Params, tasks: Tasks, step: int = 0,
                  mixed: bool = True) -> InnerHessian:
    """The inner gradients of every task at its weights (task dimension first) and products with
    their derivatives. Both products differentiate one retained graph of the batched gradient
    (reverse over reverse), so each costs one backward pass, not a rebuild of the gradient.
    With mixed=False the graph leaves out phi (cheaper) and `mixed` gives zeros."""
    points = {name: value.detach().requires_grad_() for name, value in weights.items()}
    meta = {name: value.detach().requires_grad_(mixed and value.is_floating_point()) for name, value in phi.items()}

    grads = inner_gradients(problem, points, meta, tasks, step, keep_graph=True)
    names = list(points)
    outputs = [grads[name] for name in names]
    differentiable = any(output.requires_grad for output in outputs)

    def products(wrt: Params, vectors: Params) -> Params:
        if not differentiable or not any(value.requires_grad for value in wrt.values()):
            return {name: torch.zeros_like(value) for name, value in wrt.items()}
        found = torch.autograd.grad(outputs, list(wrt.values()), grad_outputs=[vectors[name] for name in names],
                                    retain_graph=True, allow_unused=True)
        return {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(wrt.items(), found)}

    return InnerHessian(detached(grads), lambda p: products(points, p), lambda v: products(meta, v))


def top_eigenvalue(problem: Any, phi: Params, tasks: Tasks, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """[n] each task's inner-loss Hessian eigenvalue of largest magnitude at its starting weights.

    Power iteration on Hessian-vector products from a fixed random start (`seed`), all tasks in
    lock step; the estimate is the Rayleigh quotient v.Hv of the last unit vector. It converges to
    the dominant eigenvalue (with its sign) at the rate |mu_2 / mu_1| per iteration. Every task
    starts from the same vector, so a task's estimate does not depend on which tasks share its
    batch (a shard's values are the slice of the whole batch's).
    """
    weights = start_weights(problem, detached(phi), tasks)
    hvp = inner_hessian(problem, weights, phi, tasks, mixed=False).hvp
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = {name: torch.randn(value.shape[1:], generator=generator, dtype=value.dtype).to(value.device)
              .expand_as(value) for name, value in weights.items()}
    first = next(iter(weights.values()))
    estimate = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)
    for _ in range(iterations):
        norm = task_dot(vector, vector).sqrt().clamp_min(torch.finfo(estimate.dtype).tiny)
        vector = {name: value / per_task(norm, value) for name, value in vector.items()}
        product = hvp(vector)
        estimate = task_dot(vector, product)
        vector = product
    return estimate.detach()
