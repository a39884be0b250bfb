"""The meta-gradient in every mode, from one entry point the engine calls.

    second_order, first_order, truncated   autograd through the unroll of `adapt` (what it keeps
                                           of each step's graph is the mode's choice)
    reptile                                theta - phi_K per task: no backward pass at all
    implicit                               (I + H / lam)^-1 grad L_query by conjugate gradient
                                           (distmaml.meta.implicit)

Every mode returns the SUM over the batch's tasks, so that shards of one meta-batch add up exactly
across processes; the caller divides by the global meta-batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from distmaml.meta.adapt import Inner, adapt, task_losses
from distmaml.meta.functional import MetaGradient, Params, TaskBatch, detached
from distmaml.meta.implicit import implicit_meta_gradient


def meta_loss(model: nn.Module, theta: Params, batch: TaskBatch, inner: Inner,
              step_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """(objective [n], query loss after the last step [n], adapted weights) of every task.

    The objective is the query loss after adaptation, differentiable with respect to theta as
    inner.mode says; with `step_weights` ([K], MAML++'s multi-step loss) it is the weighted sum of
    the query losses after each inner step. Its mean over the meta-batch is MAML's meta-objective.
    """
    result = adapt(model, theta, batch.support_x, batch.support_y, inner, trajectory=step_weights is not None)
    final = task_losses(model, result, batch.query_x, batch.query_y, inner.loss_fn)
    objective = final
    if step_weights is not None and result.trajectory:
        per_step = torch.stack([task_losses(model, result, batch.query_x, batch.query_y, inner.loss_fn, point)
                                for point in result.trajectory])
        objective = (step_weights.to(per_step.dtype)[:, None] * per_step).sum(0)
    return objective, final, result.weights(batch.num_tasks)


def meta_gradient(model: nn.Module, theta: Params, batch: TaskBatch, inner: Inner,
                  step_weights: torch.Tensor | None = None) -> MetaGradient:
    """Sum over the batch's tasks of the meta-gradient, in inner.mode, for every entry of theta."""
    if inner.mode == "implicit":
        return implicit_meta_gradient(model, theta, batch, inner.rule.lr, inner.steps, loss_fn=inner.loss_fn,
                                      **(inner.implicit or {}))
    if inner.mode == "reptile":
        return reptile_meta_gradient(model, theta, batch, inner)
    objective, final, adapted = meta_loss(model, theta, batch, inner, step_weights)
    grads = torch.autograd.grad(objective.sum(), list(theta.values()), allow_unused=True)
    grad_sum = {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(theta.items(), grads)}
    return MetaGradient(grad_sum, final.detach(), {}, detached(adapted))


def reptile_meta_gradient(model: nn.Module, theta: Params, batch: TaskBatch, inner: Inner) -> MetaGradient:
    """Reptile (Nichol et al. 2018): each task's meta-gradient is theta - phi_K, with phi_K its weights
    after K first-order inner steps; weights the inner loop does not adapt, and learned rule
    parameters, get none (the configuration refuses learned step sizes with Reptile)."""
    with torch.no_grad():
        result = adapt(model, detached(theta), batch.support_x, batch.support_y, inner, differentiated=0)
        final = task_losses(model, result, batch.query_x, batch.query_y, inner.loss_fn)
        adapted = result.weights(batch.num_tasks)
        grad_sum = {}
        for name, value in theta.items():
            moved = result.adapted.get(name)
            if moved is None:
                grad_sum[name] = torch.zeros_like(value)
            else:
                grad_sum[name] = (value.detach() - moved).sum(0) if result.batched else torch.zeros_like(value)
    return MetaGradient(grad_sum, final, {}, adapted)
