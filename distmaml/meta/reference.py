"""The per-task reference: one task at a time, plain torch.autograd, no torch.func transforms.

It is deliberately the textbook algorithm, written independently of the batched engine -- the
update rules too are written out again here from their settings (name, lr, momentum, betas, eps),
sharing no code with distmaml.meta.rules -- so that tests and benchmarks can hold the engine to it.
"""

from __future__ import annotations

import torch
from torch import nn

from distmaml.meta.functional import (LossFn, MetaGradient, Params, TaskBatch, detached, differentiated_steps,
                                      functional_forward, mse)


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


def _textbook_update(rule, name: str, weight, grad, slots: dict, theta: Params, step: int):
    """One weight's inner update, as each rule's paper writes it."""
    if rule.name == "sgd":
        return weight - rule.lr * grad
    if rule.name == "meta_sgd":
        return weight - theta["inner.lr." + name] * grad
    if rule.name == "lslr":
        sizes = theta["inner.lr." + name]
        return weight - sizes[min(step, sizes.numel() - 1)] * grad
    if rule.name == "momentum":
        slots["b"] = grad if "b" not in slots else rule.momentum * slots["b"] + grad
        return weight - rule.lr * slots["b"]
    if rule.name == "adam":
        beta1, beta2 = rule.betas
        slots["m"] = (1 - beta1) * grad + (beta1 * slots["m"] if "m" in slots else 0)
        slots["v"] = (1 - beta2) * grad ** 2 + (beta2 * slots["v"] if "v" in slots else 0)
        # sqrt at exactly 0 has an infinite derivative; taken of 1 there and multiplied by 0 instead.
        seen = (slots["v"] > 0).to(grad.dtype)
        root = torch.sqrt(slots["v"] * seen + (1 - seen)) * seen
        m_hat, root_hat = slots["m"] / (1 - beta1 ** (step + 1)), root / (1 - beta2 ** (step + 1)) ** 0.5
        return weight - rule.lr * m_hat / (root_hat + rule.eps)
    raise ValueError(f"the reference knows no rule {rule.name!r}")


def reference_adapt(model: nn.Module, theta: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner,
                    differentiated: int | None = None) -> list[Params]:
    """One task's model weights after each of inner.steps steps (the last is the adapted weights)."""
    steps = inner.steps
    if differentiated is None:
        differentiated = differentiated_steps(inner.mode, steps, inner.truncate)
    weights = {name: value for name, value in theta.items() if not name.startswith("inner.lr.")}
    adapting = [name for name in weights if not inner.adapt or any(name.startswith(p) for p in inner.adapt)]
    slots = {name: {} for name in adapting}
    visited = []
    for step in range(steps):
        differentiable = step >= steps - differentiated
        point = dict(weights) if differentiable else {k: v.detach().requires_grad_(k in adapting)
                                                      for k, v in weights.items()}
        loss = inner.loss_fn(functional_forward(model, point, support_x), support_y)
        grads = torch.autograd.grad(loss, [point[name] for name in adapting], create_graph=differentiable)
        weights = {**weights, **{name: _textbook_update(inner.rule, name, weights[name], g, slots[name], theta, step)
                                 for name, g in zip(adapting, grads)}}
        visited.append(weights)
    return visited or [weights]


def meta_gradient_loop(model: nn.Module, theta: Params, batch: TaskBatch, inner,
                       step_weights: torch.Tensor | None = None) -> MetaGradient:
    """Sum over tasks of the meta-gradient in inner.mode, one task after another; every mode but
    implicit (see distmaml.meta.implicit.implicit_meta_gradient_loop)."""
    objectives, losses, moved = [], [], []
    for i in range(batch.num_tasks):
        task = batch.task(i)
        differentiated = 0 if inner.mode == "reptile" else None
        visited = reference_adapt(model, theta, task.support_x, task.support_y, inner, differentiated)

        def query_loss(weights: Params) -> torch.Tensor:
            return inner.loss_fn(functional_forward(model, weights, task.query_x), task.query_y)

        losses.append(query_loss(visited[-1]))
        if inner.mode == "reptile":
            moved.append({name: theta[name].detach() - value.detach() for name, value in visited[-1].items()})
        elif step_weights is not None and inner.steps:
            objectives.append(sum(w * query_loss(v) for w, v in zip(step_weights, visited)))
        else:
            objectives.append(losses[-1])
    final = torch.stack(losses).detach()
    if inner.mode == "reptile":
        grad_sum = {name: sum(m[name] for m in moved) if name in moved[0] else torch.zeros_like(value)
                    for name, value in theta.items()}
        return MetaGradient(grad_sum, final, {})
    grads = torch.autograd.grad(torch.stack(objectives).sum(), list(theta.values()), allow_unused=True)
    grad_sum = {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(theta.items(), grads)}
    return MetaGradient(grad_sum, final, {})
