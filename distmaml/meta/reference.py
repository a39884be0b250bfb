"""The per-task reference: one task at a time, plain torch.autograd, no torch.func transforms.

It is deliberately the textbook algorithm of every method, written independently of the batched
engine and of the method objects -- the update rules too are written out again here from their
settings (name, lr, momentum, betas, eps), sharing no code with distmaml.meta.rules, and the
implicit methods use their own textbook conjugate gradient and Neumann series -- so that tests and
benchmarks can hold the engine to it. It shares only the problem (the model and its losses).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from distmaml.meta.functional import (LossFn, MetaGradient, Noise, Params, Tasks, detached, functional_forward, mse,
                                      num_tasks, task_at, tasks_slice)
from distmaml.meta.methods.implicit import CG  # which solver's settings to read, nothing of its solve

LEARNED = "inner.lr."  # the rules' naming of learned step sizes, spelled out again


def inner_loop(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
               inner_lr: float, inner_steps: int, mode: str = "second_order", truncate: int | None = None,
               loss_fn: LossFn = mse) -> Params:
    """Adapt `params` to one task: `inner_steps` SGD steps of size `inner_lr` on its support set.

    The returned weights stay in the autograd graph of `params` as `mode` says: through every step
    (second_order), through the last `truncate` steps (truncated), or through none (first_order,
    where d(adapted)/d(params) is the identity).
    """
    differentiated = {"second_order": inner_steps, "first_order": 0, "truncated": truncate}.get(mode)
    if differentiated is None or not 0 <= differentiated <= inner_steps:
        raise ValueError(f"inner_loop: mode must be second_order, first_order or truncated with 0 <= truncate <= "
                         f"inner_steps, got {mode!r} (truncate {truncate})")
    first_differentiated = inner_steps - differentiated
    for step in range(inner_steps):
        differentiable = step >= first_differentiated
        point = params if differentiable else {k: v.requires_grad_() for k, v in detached(params).items()}
        loss = loss_fn(functional_forward(model, point, support_x), support_y)
        grads = torch.autograd.grad(loss, list(point.values()), create_graph=differentiable)
        params = {name: value - inner_lr * grad for (name, value), grad in zip(params.items(), grads)}
    return params


def _textbook_update(rule, name: str, weight, grad, slots: dict, phi: Params, step: int):
    """One weight's inner update, as each rule's paper writes it."""
    if rule.name == "sgd":
        return weight - rule.lr * grad
    if rule.name == "meta_sgd":
        return weight - phi[LEARNED + name] * grad
    if rule.name == "lslr":
        sizes = phi[LEARNED + name]
        return weight - sizes[min(step, sizes.numel() - 1)] * grad
    if rule.name == "schedule":
        block = min(step * rule.blocks // max(rule.steps, 1), rule.blocks - 1)
        return weight - torch.exp(phi[LEARNED + "log_schedule"][block]) * grad
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


def reference_unroll(problem: Any, phi: Params, task: Any, inner, differentiated: int | None = None,
                     steps: int | None = None) -> list[Params]:
    """One task's inner weights before and after each step ([w_0, ..., w_K]), with the graph
    `differentiated` (the last steps whose gradients keep theirs; default: the method's) says."""
    return _textbook_run(problem, phi, task, inner, differentiated, steps)[0]


def _textbook_run(problem: Any, phi: Params, task: Any, inner, differentiated: int | None = None,
                  steps: int | None = None) -> tuple[list[Params], dict[str, dict]]:
    """reference_unroll's weights, and the rule's slots (momentum buffers, Adam moments) after the last step."""
    steps = inner.steps if steps is None else steps
    if differentiated is None:
        differentiated = {"second_order": steps, "truncated": min(getattr(inner.method, "truncate", 0), steps)}.get(
            inner.method.name, 0)
    # A start that does not depend on phi (a fresh initialisation) is a leaf the steps differentiate.
    weights = {name: value if value.requires_grad else value.detach().requires_grad_()
               for name, value in problem.start(phi, task).items()}
    names = list(weights)
    slots: dict[str, dict] = {name: {} for name in names}
    visited = [weights]
    for step in range(steps):
        differentiable = step >= steps - differentiated
        at_phi = phi if differentiable else detached(phi)
        point = weights if differentiable else {k: v.detach().requires_grad_() for k, v in weights.items()}
        loss = problem.inner_loss(point, at_phi, task, step)
        grads = torch.autograd.grad(loss, [point[name] for name in names], create_graph=differentiable)
        weights = {name: _textbook_update(inner.rule, name, weights[name], g, slots[name], phi, step)
                   for name, g in zip(names, grads)}
        visited.append(weights)
    return visited, slots


def _sum_grads(objective: torch.Tensor, phi: Params) -> Params:
    grads = torch.autograd.grad(objective, list(phi.values()), allow_unused=True)
    return {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(phi.items(), grads)}


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((u * v).sum() for u, v in zip(a, b))


def _conjugate_gradient(matvec, rhs: list[torch.Tensor], cg_steps: int, cg_tol: float):
    """Textbook CG from x = 0 on flat lists of tensors; stops at r.r <= tol or p.Ap <= 0."""
    x = [torch.zeros_like(v) for v in rhs]
    r = [v.clone() for v in rhs]
    p = [v.clone() for v in rhs]
    rr = _dot(r, r)
    rhs_norm = rr.sqrt()
    steps_taken = 0
    while steps_taken < cg_steps and rr > cg_tol:
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        if pAp <= 0:
            break
        alpha = rr / pAp
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, Ap)]
        rr_next = _dot(r, r)
        p = [ri + (rr_next / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_next
        steps_taken += 1
    relative = rr.sqrt() / rhs_norm if rhs_norm > 0 else torch.zeros_like(rr)
    return x, {"cg_residual": relative, "cg_steps": torch.tensor(steps_taken)}


def _neumann(matvec, rhs: list[torch.Tensor], terms: int, alpha: float):
    """alpha * sum_{j=0..terms} (I - alpha A)^j rhs, written out term by term."""
    term = [v.clone() for v in rhs]
    total = [v.clone() for v in rhs]
    for _ in range(terms):
        term = [t - alpha * a for t, a in zip(term, matvec(term))]
        total = [s + t for s, t in zip(total, term)]
    solution = [alpha * s for s in total]
    error = [a - b for a, b in zip(matvec(solution), rhs)]
    norm = _dot(rhs, rhs).sqrt()
    growth = _dot(term, term).sqrt() / norm if norm > 0 else torch.zeros_like(norm)
    residual = _dot(error, error).sqrt() / norm if norm > 0 else torch.zeros_like(norm)
    return solution, {"neumann_residual": residual, "neumann_growth": growth}


def _implicit_task(problem: Any, phi: Params, task: Any, inner) -> tuple[Params, torch.Tensor, dict]:
    """One task's implicit hypergradient grad_phi L_out - (d_phi grad_w L_in)^T A^-1 grad_w L_out."""
    method = inner.method
    constants = detached(phi)
    if method.safeguard:
        weights = {name: value.detach() for name, value in problem.start(phi, task).items()}
        names = list(weights)
        for step in range(inner.steps):  # plain SGD, each step capped at the Cauchy step g.g / g.A g
            point = {name: value.requires_grad_() for name, value in detached(weights).items()}
            grads = torch.autograd.grad(problem.inner_loss(point, constants, task, step), [point[n] for n in names],
                                        create_graph=True)
            products = torch.autograd.grad(grads, [point[n] for n in names], [g.detach() for g in grads])
            plain = [g.detach() for g in grads]
            squared, curvature = _dot(plain, plain), _dot(plain, products)
            size = min(inner.rule.lr, (squared / curvature).item()) if curvature > 0 else inner.rule.lr
            weights = {n: point[n].detach() - size * g for n, g in zip(names, plain)}
    else:
        weights = {n: v.detach() for n, v in reference_unroll(problem, constants, task, inner, differentiated=0)[-1].items()}
        names = list(weights)
    point = {name: value.requires_grad_() for name, value in detached(weights).items()}
    meta = {name: value.detach().requires_grad_() for name, value in phi.items()}
    outer = problem.outer_loss(point, meta, task)
    found = torch.autograd.grad(outer, [*point.values(), *meta.values()], allow_unused=True)
    rhs = [torch.zeros_like(point[n]) if g is None else g for n, g in zip(names, found[:len(names)])]
    direct = {n: torch.zeros_like(meta[n]) if g is None else g for n, g in zip(meta, found[len(names):])}
    inner_grads = torch.autograd.grad(problem.inner_loss(point, meta, task, max(inner.steps - 1, 0)),
                                      [point[n] for n in names], create_graph=True)

    def matvec(p: list[torch.Tensor]) -> list[torch.Tensor]:
        products = torch.autograd.grad(inner_grads, [point[n] for n in names], p, retain_graph=True)
        return [h + method.damping * q for h, q in zip(products, p)]

    solver = method.solve  # its settings only: the solve itself is written again below
    if isinstance(solver, CG):
        solution, stats = _conjugate_gradient(matvec, rhs, solver.cg_steps, solver.cg_tol)
    else:
        solution, stats = _neumann(matvec, rhs, solver.terms, solver.alpha)
    mixed = torch.autograd.grad(inner_grads, list(meta.values()), solution, allow_unused=True, retain_graph=True)
    grad = {n: direct[n] - (0 if m is None else m) for n, m in zip(meta, mixed)}
    stats["inner_grad_norm"] = torch.sqrt(_dot([g.detach() for g in inner_grads], [g.detach() for g in inner_grads]))
    return grad, outer.detach(), stats


def _finite_difference_task(problem: Any, phi: Params, task: Any, inner) -> tuple[Params, torch.Tensor]:
    """One task's finite-difference hypergradient: the last step's second derivatives by central differences."""
    eps, last = inner.method.eps, inner.steps - 1
    visited, slots = _textbook_run(problem, phi, task, inner, differentiated=0, steps=max(last, 0))
    weights = visited[-1]
    if last < 0:
        outer = problem.outer_loss(weights, phi, task)
        return _sum_grads(outer, phi), outer.detach()
    names = list(weights)
    point = {n: v.detach().requires_grad_() for n, v in weights.items()}
    grads = torch.autograd.grad(problem.inner_loss(point, detached(phi), task, last), [point[n] for n in names])
    gradient = [g.detach().requires_grad_() for g in grads]
    final = {n: _textbook_update(inner.rule, n, weights[n], g, slots[n], phi, last) for n, g in zip(names, gradient)}
    outer = problem.outer_loss(final, phi, task)
    v = torch.autograd.grad(outer, [final[n] for n in names], retain_graph=True)
    sizes = torch.autograd.grad([final[n] for n in names], gradient, v, retain_graph=True)
    d = [-s.detach() for s in sizes]
    norm = _dot(d, d).sqrt()
    if norm > 0:
        r = eps / norm
        meta = {n: value.detach().requires_grad_() for n, value in phi.items()}

        def both(sign: float):
            at = {n: (point[n].detach() + sign * r * di).requires_grad_() for n, di in zip(names, d)}
            loss = problem.inner_loss(at, meta, task, last)
            found = torch.autograd.grad(loss, [*at.values(), *meta.values()], allow_unused=True)
            return [torch.zeros_like(x) if g is None else g for x, g in zip([*at.values(), *meta.values()], found)]

        plus, minus = both(1.0), both(-1.0)
        difference = [(p - m) / (2 * r) for p, m in zip(plus, minus)]
        hessian_d, mixed_d = difference[:len(names)], dict(zip(meta, difference[len(names):]))
        carried = sum((-h.detach() * weights[n]).sum() for n, h in zip(names, hessian_d))
    else:
        carried, mixed_d = 0.0, {n: torch.zeros_like(v) for n, v in phi.items()}
    total = _sum_grads(outer + carried, phi)
    return {n: total[n] - mixed_d[n] for n in phi}, outer.detach()


def _one_task_at_a_time(problem, phi, tasks, inner, step_weights, noise) -> MetaGradient:
    """A stochastic method one task (one group of runs: PES's pairs) at a time, the results joined."""
    count = num_tasks(tasks)
    first = next(iter(phi.values()))
    key = torch.zeros((), dtype=torch.int64, device=first.device) if noise is None else noise.key
    index = torch.arange(count, device=first.device) if noise is None else noise.index
    group = int(getattr(inner.method, "run_group", 1))
    parts = [inner.method.hypergradient(problem, phi, tasks_slice(tasks, i, i + group), inner, step_weights,
                                        noise=Noise(key, index[i:i + group])) for i in range(0, count, group)]

    def joined(trees):
        return None if trees[0] is None else tree_map(lambda *leaves: torch.cat(leaves), *trees)

    return MetaGradient({name: sum(part.grad_sum[name] for part in parts) for name in phi},
                        torch.cat([part.task_losses for part in parts]),
                        {name: torch.cat([part.stats[name] for part in parts]) for name in parts[0].stats},
                        joined([part.adapted for part in parts]), joined([part.carried for part in parts]))


def meta_gradient_loop(problem: Any, phi: Params, tasks: Tasks, inner,
                       step_weights: torch.Tensor | None = None, noise=None) -> MetaGradient:
    """Sum over tasks of the hypergradient inner.method names, one task after another. A stochastic
    method (evolution strategies) is its own per-task reference: it runs on one task at a time, each
    with its own global index, so it draws the perturbations the batch would."""
    method = inner.method.name
    if getattr(inner.method, "stochastic", False):
        return _one_task_at_a_time(problem, phi, tasks, inner, step_weights, noise)
    losses, grads, stats = [], [], []
    for i in range(num_tasks(tasks)):
        task = task_at(tasks, i)
        if method in ("implicit", "neumann"):
            grad, loss, task_stats = _implicit_task(problem, phi, task, inner)
            grads.append(grad), losses.append(loss), stats.append(task_stats)
            continue
        if method == "finite_difference":
            grad, loss = _finite_difference_task(problem, phi, task, inner)
            grads.append(grad), losses.append(loss)
            continue
        visited = reference_unroll(problem, phi, task, inner)
        final = problem.outer_loss(visited[-1], phi, task)
        losses.append(final.detach())
        if method == "reptile":
            grads.append({n: phi[n].detach() - visited[-1][n].detach() if n in visited[-1]
                          else torch.zeros_like(v) for n, v in phi.items()})
            continue
        objective = final
        if step_weights is not None and inner.steps:
            objective = sum(w * problem.outer_loss(v, phi, task) for w, v in zip(step_weights, visited[1:]))
        grads.append(_sum_grads(objective, phi))
    grad_sum = {name: sum(g[name] for g in grads).detach() for name in phi}
    task_stats = {name: torch.stack([s[name] for s in stats]) for name in stats[0]} if stats else {}
    return MetaGradient(grad_sum, torch.stack(losses), task_stats)
