"""The per-task reference: one task at a time, plain torch.autograd, no torch.func transforms.

It is deliberately the textbook algorithm, written independently of the batched engine, so that
tests and benchmarks can hold the engine to it.
"""

from __future__ import annotations

import torch
from torch import nn

from distmaml.meta.functional import LossFn, Params, detached, differentiated_steps, functional_forward
from distmaml.tasks import TaskBatch
from distmaml.tasks.sine import mse


def inner_loop(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
               inner_lr: float, inner_steps: int, mode: str = "second_order", truncate: int | None = None,
               loss_fn: LossFn = mse) -> Params:
    """Adapt `params` to one task: `inner_steps` SGD steps of size `inner_lr` on its support set.

    The returned weights stay in the autograd graph of `params` as `mode` says: through every step
    (second_order), through the last `truncate` steps (truncated), or through none (first_order,
    where d(adapted)/d(params) is the identity).
    """
    first_differentiated = inner_steps - differentiated_steps(mode, inner_steps, truncate)
    for step in range(inner_steps):
        differentiable = step >= first_differentiated
        point = params if differentiable else {k: v.requires_grad_() for k, v in detached(params).items()}
        loss = loss_fn(functional_forward(model, point, support_x), support_y)
        grads = torch.autograd.grad(loss, list(point.values()), create_graph=differentiable)
        params = {name: value - inner_lr * grad for (name, value), grad in zip(params.items(), grads)}
    return params


def meta_gradient_loop(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float, inner_steps: int,
                       mode: str = "second_order", truncate: int | None = None,
                       loss_fn: LossFn = mse) -> tuple[Params, torch.Tensor]:
    """Sum over tasks of d L_query(adapted) / d params, one task after another.

    Returns (gradient sum, per-task query losses after adaptation).
    """
    losses = []
    for i in range(batch.num_tasks):
        task = batch.task(i)
        adapted = inner_loop(model, params, task.support_x, task.support_y, inner_lr, inner_steps, mode,
                             truncate, loss_fn)
        losses.append(loss_fn(functional_forward(model, adapted, task.query_x), task.query_y))
    task_losses = torch.stack(losses)
    grads = torch.autograd.grad(task_losses.sum(), list(params.values()))
    return dict(zip(params, grads)), task_losses.detach()
