"""The batched engine: a process's tasks adapt together, vmapped over the task dimension.

Each inner step is one vmap of a pure per-task SGD step (torch.func.grad over functional_call);
the steps are an ordinary Python loop over K, so the meta-gradient is plain autograd through that
loop. This is functorch's MAML recipe, arranged by step rather than by task so that truncation
and recomputation can choose per step what the backward pass keeps.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn
from torch.func import grad, vmap

from distmaml.meta.checkpointing import check_recomputable, plan_segments, recomputed
from distmaml.meta.functional import LossFn, Params, detached, differentiated_steps, functional_forward
from distmaml.tasks import TaskBatch
from distmaml.tasks.sine import mse


class MetaGradient(NamedTuple):
    """What one meta-gradient computation returns for a process's tasks."""

    grad_sum: Params  # sum over tasks of d L_query(adapted_i) / d theta
    task_losses: torch.Tensor  # [n] query loss of each task after adaptation, detached
    stats: dict[str, torch.Tensor]  # mode-specific diagnostics (e.g. the CG residual), detached
    adapted: Params | None = None  # detached adapted weights, task dimension first (for metrics)


def sgd_step(model: nn.Module, loss_fn: LossFn, inner_lr: float, differentiable: bool) -> Callable:
    """One task's inner SGD step params -> params - lr * grad L_support(params), a pure function.

    A non-differentiable step evaluates the gradient at detached weights: the update still moves
    the weights, but the backward pass treats it as a constant (first-order MAML's approximation)
    and keeps no second-order graph for it.
    """

    def step(params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        def support_loss(point: Params) -> torch.Tensor:
            return loss_fn(functional_forward(model, point, support_x), support_y)

        grads = grad(support_loss)(params if differentiable else detached(params))
        return {name: value - inner_lr * grads[name] for name, value in params.items()}

    return step


def adapt(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner_lr: float,
          inner_steps: int, mode: str = "second_order", truncate: int | None = None,
          loss_fn: LossFn = mse, *, checkpoint: str = "none", checkpoint_segment: int | None = None,
          ) -> tuple[Params, bool]:
    """Adapt shared weights `params` to every task of the batch at once.

    Returns (adapted, batched): while no step has run yet, the weights are still the shared,
    unbatched `params` (batched=False); after a step each has a leading task dimension.
    `checkpoint` ('none', 'every_step', 'segments' with `checkpoint_segment` steps, 'auto') makes
    the differentiated steps recompute in the backward pass instead of keeping their graph; the
    result and its gradients are unchanged (see distmaml.meta.checkpointing).
    """
    differentiated = differentiated_steps(mode, inner_steps, truncate)
    first_differentiated = inner_steps - differentiated
    plan = plan_segments(inner_steps, differentiated, checkpoint, checkpoint_segment)
    if any(checkpointed for _, _, checkpointed in plan):
        check_recomputable(model)
    batched = False
    for start, end, checkpointed in plan:
        def segment(params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                    start: int = start, end: int = end, batched: bool = batched) -> Params:
            for step in range(start, end):
                update = sgd_step(model, loss_fn, inner_lr, differentiable=step >= first_differentiated)
                in_dims = (0 if batched or step > start else None, 0, 0)
                params = vmap(update, in_dims=in_dims)(params, support_x, support_y)
            return params

        run = recomputed if checkpointed else _run
        params = run(segment, params, support_x, support_y)
        batched = True
    return params, batched


def _run(segment: Callable[..., Params], params: Params, *data: torch.Tensor) -> Params:
    """A segment run plainly, its graph kept for the backward pass (the counterpart of `recomputed`)."""
    return segment(params, *data)


def task_losses(model: nn.Module, params: Params, batched: bool, x: torch.Tensor, y: torch.Tensor,
                loss_fn: LossFn = mse) -> torch.Tensor:
    """[n] loss of each task's (possibly shared) weights on its own points."""

    def loss(point: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_forward(model, point, task_x), task_y)

    return vmap(loss, in_dims=(0 if batched else None, 0, 0))(params, x, y)


def meta_loss(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float, inner_steps: int,
              mode: str = "second_order", truncate: int | None = None, loss_fn: LossFn = mse, *,
              checkpoint: str = "none", checkpoint_segment: int | None = None) -> torch.Tensor:
    """[n] post-adaptation query loss of each task, differentiable with respect to `params` as
    `mode` says; their mean over the meta-batch is MAML's meta-objective."""
    adapted, batched = adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, mode,
                             truncate, loss_fn, checkpoint=checkpoint, checkpoint_segment=checkpoint_segment)
    return task_losses(model, adapted, batched, batch.query_x, batch.query_y, loss_fn)


def meta_gradient(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float, inner_steps: int,
                  mode: str = "second_order", truncate: int | None = None, loss_fn: LossFn = mse, *,
                  checkpoint: str = "none", checkpoint_segment: int | None = None,
                  implicit: Mapping[str, float] | None = None) -> MetaGradient:
    """Sum over the batch's tasks of the meta-gradient d L_query(adapted) / d params.

    A sum, not a mean, so that shards of one meta-batch add up exactly across processes; the
    caller divides by the global meta-batch size. mode="implicit" needs `implicit`, the keyword
    arguments of distmaml.meta.implicit.implicit_meta_gradient (lam, cg_steps, cg_damping, cg_tol:
    dataclasses.asdict(config.implicit)).
    """
    if mode == "implicit":
        if implicit is None:
            raise ValueError("mode='implicit' needs implicit={'lam': ..., 'cg_steps': ...} (config.implicit)")
        # Imported here: implicit.py builds on this module's MetaGradient.
        from distmaml.meta.implicit import implicit_meta_gradient

        return implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, loss_fn=loss_fn, **implicit)
    adapted, batched = adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, mode,
                             truncate, loss_fn, checkpoint=checkpoint, checkpoint_segment=checkpoint_segment)
    losses = task_losses(model, adapted, batched, batch.query_x, batch.query_y, loss_fn)
    grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
    grad_sum = {name: torch.zeros_like(value) if g is None else g
                for (name, value), g in zip(params.items(), grads)}
    if not batched:  # no inner step: every task's adapted weights are theta itself
        adapted = {name: value.expand(batch.num_tasks, *value.shape) for name, value in adapted.items()}
    return MetaGradient(grad_sum, losses.detach(), {}, detached(adapted))
