"""Implicit meta-gradients (iMAML; Rajeswaran, Finn, Kakade and Levine 2019).

Each task solves an inner problem pulled towards the shared weights theta,

    phi* = argmin_phi  L_support(phi) + (lam / 2) ||phi - theta||^2,

approximately, by K plain SGD steps from phi = theta that keep no graph: memory does not grow with
K. Differentiating the optimality condition grad L_support(phi*) + lam (phi* - theta) = 0 gives
d phi* / d theta = (I + H / lam)^-1 with H the support Hessian at phi*, so the task's meta-gradient is

    g = (I + H / lam)^-1 grad L_query(phi*),

which conjugate gradient solves from Hessian-vector products alone. `cg_damping` adds to the
diagonal, ((1 + damping) I + H / lam) g = grad L_query, for stability when H is far from PSD.

The implicit gradient ignores the inner path, so nothing in it stops theta sharpening the support
loss (README.md, "Implicit MAML", has the measurements on sine) until
a fixed inner step overshoots, inner_lr (lam + mu_max) > 2, and phi goes NaN. `inner_safeguard`
caps each task's step at its Cauchy step (`safeguarded_step_sizes`): the inner problem, its
solution and the meta-gradient formula at phi_K stay exactly as above; only the path to phi_K is
made to descend.

The batched engine adapts every task at once (one vmap per inner step) and runs CG on [n, ...]
tensors outside vmap; its Hessian-vector products differentiate once more through one retained
double-backward graph of the batched support gradient (reverse over reverse). Forward over reverse,
vmap(jvp(grad)), is kept as hvp="jvp" for comparison only: it rebuilds the gradient at every CG
step (slower: it rebuilds the gradient for every product) and fails on
F.mse_loss, the sine family's loss ("ZeroTensors are immutable", pytorch/pytorch#123996).
`implicit_meta_gradient_loop` is the per-task textbook version, plain autograd, the reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp, vmap

from distmaml.meta.functional import LossFn, MetaGradient, Params, TaskBatch, detached, functional_forward, mse
from distmaml.meta.hessian import per_task, support_hvp, task_dot


def regularised_adapt(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                      inner_lr: float, inner_steps: int, lam: float, loss_fn: LossFn = mse,
                      safeguard: bool = False) -> Params:
    """phi_K of every task: K SGD steps on L_support(phi) + lam/2 ||phi - theta||^2 from phi = theta.

    No graph is kept (the implicit meta-gradient never differentiates the path), so the result is
    detached and carries a leading task dimension even for K = 0. With `safeguard` each task's step
    is min(inner_lr, its Cauchy step), see `safeguarded_step_sizes`.
    """
    theta = detached(params)
    num_tasks = support_x.shape[0]
    phi = {name: value.expand(num_tasks, *value.shape).clone() for name, value in theta.items()}
    for _ in range(inner_steps):
        phi = regularised_step(model, phi, theta, support_x, support_y, inner_lr, lam, loss_fn, safeguard)
    return phi


def regularised_step(model: nn.Module, phi: Params, theta: Params, support_x: torch.Tensor,
                     support_y: torch.Tensor, inner_lr: float, lam: float, loss_fn: LossFn = mse,
                     safeguard: bool = False) -> Params:
    """One SGD step of every task (phi has a leading task dimension) on L_support + lam/2 ||phi - theta||^2."""
    if safeguard:
        inner_grads, step = safeguarded_step_sizes(model, phi, theta, support_x, support_y, inner_lr, lam, loss_fn)
        return {name: (phi[name] - per_task(step, phi[name]) * inner_grads[name]).detach() for name in phi}

    def task_step(point: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> Params:
        grads = grad(lambda p: loss_fn(functional_forward(model, p, task_x), task_y))(point)
        return {name: point[name] - inner_lr * (grads[name] + lam * (point[name] - theta[name])) for name in point}

    return detached(vmap(task_step)(phi, support_x, support_y))


def safeguarded_step_sizes(model: nn.Module, phi: Params, theta: Params, support_x: torch.Tensor,
                           support_y: torch.Tensor, inner_lr: float, lam: float,
                           loss_fn: LossFn = mse) -> tuple[Params, torch.Tensor]:
    """(regularised inner gradients g_i, step sizes [n]) for one safeguarded inner step of every task.

    Why: a fixed step diverges once inner_lr (lam + mu_max) > 2, and nothing in the implicit
    meta-gradient stops theta sharpening the support loss until it does (on sine within the first
    thousand iterations; README.md, "Implicit MAML"). The step is min(inner_lr, alpha_i) with alpha_i = g.g / g.(H + lam I)g
    the exact line minimiser of the local quadratic model along -g (the Cauchy step; one
    Hessian-vector product per task). alpha_i >= 1 / (lam + mu_max), so the cap is inactive
    wherever the fixed step is already safe (inner_lr (lam + mu_max) <= 1) and on a quadratic every
    step decreases the regularised loss. The fixed point, and so the problem the implicit gradient
    differentiates, is unchanged. Where the curvature along g is not positive the step is inner_lr.
    Vectorised over tasks (no host sync).
    """
    support_grads, hessian_vector = support_hvp(model, phi, support_x, support_y, loss_fn)
    inner_grads = {name: support_grads[name] + lam * (phi[name] - theta[name]) for name in phi}
    squared = task_dot(inner_grads, inner_grads)
    curvature = task_dot(inner_grads, hessian_vector(inner_grads)) + lam * squared
    positive = curvature > 0
    cauchy = squared / torch.where(positive, curvature, torch.ones_like(curvature))
    step = torch.where(positive, cauchy.clamp(max=inner_lr), torch.full_like(cauchy, inner_lr))
    return inner_grads, step.detach()


def batched_cg(matvec, rhs: Params, cg_steps: int, cg_tol: float,
               stop_early: bool = True) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Solve A_i x_i = rhs_i for every task i at once by conjugate gradient from x = 0.

    vmap cannot exit early for one task, so every task runs in lock step and a task's update is
    masked off once it stops: when its squared residual r.r is at or below `cg_tol`, or when its
    curvature p.Ap is not positive (A_i is not positive definite along p, so CG's step is
    meaningless: it keeps its last iterate, as truncated-Newton methods do). With `stop_early` the
    loop ends as soon as every task has stopped, which costs one host sync per step (pass False
    under CUDA graph capture). Returns (x, relative residual |r| / |rhs| per task, CG steps taken
    per task). The residual is CG's recursive one, which matches the true one in exact arithmetic.
    """
    x = {name: torch.zeros_like(value) for name, value in rhs.items()}
    r = dict(rhs)
    p = dict(rhs)
    rr = task_dot(r, r)
    rhs_norm = rr.sqrt()
    running = rr > cg_tol
    steps_taken = torch.zeros_like(rr, dtype=torch.long)
    for _ in range(cg_steps):
        if stop_early and not bool(running.any()):
            break
        Ap = matvec(p)
        pAp = task_dot(p, Ap)
        running = running & (pAp > 0)
        alpha = torch.where(running, rr / torch.where(running, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        x = {name: x[name] + per_task(alpha, x[name]) * p[name] for name in x}
        r = {name: r[name] - per_task(alpha, r[name]) * Ap[name] for name in r}
        rr_next = task_dot(r, r)
        beta = torch.where(running, rr_next / torch.where(running, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {name: torch.where(per_task(running, p[name]), r[name] + per_task(beta, p[name]) * p[name], p[name])
             for name in p}
        steps_taken = steps_taken + running.long()
        rr = rr_next
        running = running & (rr > cg_tol)
    relative = torch.where(rhs_norm > 0, rr.sqrt() / torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rr)),
                           torch.zeros_like(rr))
    return x, relative, steps_taken


def _jvp_hvp(model: nn.Module, phi: Params, support_x: torch.Tensor, support_y: torch.Tensor, loss_fn: LossFn):
    """(support gradients, p -> H_i p_i) for every task; forward over reverse, vmap of jvp(grad),
    recomputed from scratch for every product."""

    def task_hvp(point: Params, tangent: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> Params:
        def support_grad(at: Params) -> Params:
            return grad(lambda q: loss_fn(functional_forward(model, q, task_x), task_y))(at)

        return jvp(support_grad, (point,), (tangent,))[1]

    phi = detached(phi)
    with torch.no_grad():
        grads = vmap(grad(lambda q, x, y: loss_fn(functional_forward(model, q, x), y)))(phi, support_x, support_y)
    return grads, lambda p: vmap(task_hvp)(phi, p, support_x, support_y)


# The diagnostics implicit_meta_gradient returns in MetaGradient.stats, one value per task.
IMPLICIT_STATS = ("cg_residual", "cg_steps", "inner_grad_norm")

HESSIAN_VECTOR_PRODUCTS = {"double_backward": support_hvp, "jvp": _jvp_hvp}


def implicit_meta_gradient(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float,
                           inner_steps: int, *, lam: float, cg_steps: int, cg_damping: float = 0.0,
                           cg_tol: float = 0.0, loss_fn: LossFn = mse, hvp: str = "double_backward",
                           stop_early: bool = True, inner_safeguard: bool = False) -> MetaGradient:
    """Sum over the batch's tasks of the implicit meta-gradient (I + H/lam)^-1 grad L_query(phi*).

    Damping and tolerance default to off (0); the run's values come from config.implicit.
    stats: "cg_residual" [n] relative CG residual |A g - grad L_query| / |grad L_query| per task,
    "cg_steps" [n] CG iterations each task took, "inner_grad_norm" [n] norm of the regularised
    inner gradient at phi_K (how far the K SGD steps are from the solution the formula assumes).
    """
    if lam <= 0:
        raise ValueError(f"implicit meta-gradient needs lam > 0, got {lam}")
    phi = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, lam, loss_fn,
                            inner_safeguard)

    def task_loss(point: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_forward(model, point, task_x), task_y)

    with torch.no_grad():
        query_grads, losses = vmap(grad_and_value(task_loss))(phi, batch.query_x, batch.query_y)
    support_grads, hessian_vector = HESSIAN_VECTOR_PRODUCTS[hvp](model, phi, batch.support_x, batch.support_y,
                                                                 loss_fn)
    theta = detached(params)
    inner_grads = {name: support_grads[name] + lam * (phi[name] - theta[name]) for name in phi}

    def matvec(p: Params) -> Params:
        products = hessian_vector(p)
        return {name: (1.0 + cg_damping) * p[name] + products[name] / lam for name in p}

    meta_grads, residual, steps_taken = batched_cg(matvec, query_grads, cg_steps, cg_tol, stop_early)
    grad_sum = {name: meta_grads[name].detach().sum(0) for name in params}
    stats = {"cg_residual": residual.detach(), "cg_steps": steps_taken,
             "inner_grad_norm": task_dot(inner_grads, inner_grads).sqrt()}
    return MetaGradient(grad_sum, losses.detach(), stats, detached(phi))


# ---------------------------------------------------------------------------------------------
# The per-task reference: one task at a time, plain torch.autograd, textbook conjugate gradient.


def _conjugate_gradient(matvec, rhs: list[torch.Tensor], cg_steps: int, cg_tol: float):
    """Textbook CG from x = 0 on flat lists of tensors; stops at r.r <= tol or p.Ap <= 0."""

    def dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    x = [torch.zeros_like(v) for v in rhs]
    r = [v.clone() for v in rhs]
    p = [v.clone() for v in rhs]
    rr = dot(r, r)
    rhs_norm = rr.sqrt()
    steps_taken = 0
    while steps_taken < cg_steps and rr > cg_tol:
        Ap = matvec(p)
        pAp = dot(p, Ap)
        if pAp <= 0:
            break
        alpha = rr / pAp
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, Ap)]
        rr_next = dot(r, r)
        p = [ri + (rr_next / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_next
        steps_taken += 1
    relative = rr.sqrt() / rhs_norm if rhs_norm > 0 else torch.zeros_like(rr)
    return x, relative, steps_taken


def implicit_meta_gradient_loop(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float,
                                inner_steps: int, *, lam: float, cg_steps: int, cg_damping: float = 0.0,
                                cg_tol: float = 0.0, loss_fn: LossFn = mse,
                                inner_safeguard: bool = False) -> MetaGradient:
    """The same meta-gradient as `implicit_meta_gradient`, one task after another."""
    names = list(params)
    theta = [value.detach() for value in params.values()]
    grad_sum = [torch.zeros_like(value) for value in theta]
    losses, residuals, steps, inner_norms = [], [], [], []
    for i in range(batch.num_tasks):
        task = batch.task(i)

        def loss_at(point: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_forward(model, dict(zip(names, point)), x), y)

        phi = [value.clone() for value in theta]
        for _ in range(inner_steps):
            point = [value.requires_grad_() for value in phi]
            grads = torch.autograd.grad(loss_at(point, task.support_x, task.support_y), point,
                                        create_graph=inner_safeguard)
            inner = [g + lam * (w.detach() - t) for w, g, t in zip(point, grads, theta)]
            step = inner_lr
            if inner_safeguard:  # the Cauchy step g.g / g.(H + lam I)g, capped at inner_lr
                products = torch.autograd.grad(grads, point, grad_outputs=[g.detach() for g in inner])
                squared = sum((g.detach() * g.detach()).sum() for g in inner)
                curvature = sum((g.detach() * h).sum() for g, h in zip(inner, products)) + lam * squared
                if curvature > 0:
                    step = min(inner_lr, (squared / curvature).item())
            with torch.no_grad():
                phi = [w - step * g for w, g in zip(point, inner)]
        point = [value.detach().requires_grad_() for value in phi]
        query_loss = loss_at(point, task.query_x, task.query_y)
        query_grads = torch.autograd.grad(query_loss, point)
        support_grads = torch.autograd.grad(loss_at(point, task.support_x, task.support_y), point, create_graph=True)

        def matvec(p: list[torch.Tensor]) -> list[torch.Tensor]:
            products = torch.autograd.grad(support_grads, point, grad_outputs=p, retain_graph=True)
            return [(1.0 + cg_damping) * pi + h / lam for pi, h in zip(p, products)]

        meta_grad, residual, taken = _conjugate_gradient(matvec, list(query_grads), cg_steps, cg_tol)
        grad_sum = [total + g.detach() for total, g in zip(grad_sum, meta_grad)]
        inner = [g.detach() + lam * (w.detach() - t) for g, w, t in zip(support_grads, point, theta)]
        inner_norms.append(torch.sqrt(sum((g * g).sum() for g in inner)))
        losses.append(query_loss.detach())
        residuals.append(residual.detach())
        steps.append(taken)
    stats = {"cg_residual": torch.stack(residuals), "cg_steps": torch.tensor(steps),
             "inner_grad_norm": torch.stack(inner_norms)}
    return MetaGradient(dict(zip(names, grad_sum)), torch.stack(losses), stats)
