"""The finite-difference hypergradient (DARTS' second-order approximation, Liu et al. 2019; SAMA).

It differentiates the last inner step only, like truncated mode with T = 1, but replaces that
step's second derivatives by a central difference of first derivatives. With the last step
w_K = w - a (.) g(w, phi) (a: the rule's step sizes, fixed or learned), v = grad_{w_K} L_out and
d = a (.) v, the exact T = 1 hypergradient needs H d and (d_phi g)^T d; here

    H d             ~ [grad_w L_in(w + r d) - grad_w L_in(w - r d)] / 2r
    (d_phi g)^T d   ~ [grad_phi L_in(w + r d) - grad_phi L_in(w - r d)] / 2r,     r = eps / |d|

per task, so the perturbation has length `eps` in weight space. Only first-order backward passes
run (no double backward), which is what lets the method work where second derivatives are
unavailable or too costly. The approximation error is that of a central difference: it shrinks
like eps^2 (the third derivatives of L_in along d) until rounding takes over (about
sqrt(machine epsilon) relative in eps). Earlier steps are first order, as in truncated mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.hessian import per_task, task_dot
from distmaml.meta.methods.base import MethodError, WithoutUnrollGraph, gradient_sum, refuse_step_weights
from distmaml.meta.unrolling import start_weights, step_views, task_values, unroll


@dataclass(frozen=True)
class FiniteDifference(WithoutUnrollGraph):
    eps: float = 0.01
    name = "finite_difference"
    setting_keys = {"eps": "finite_difference.eps"}

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise MethodError("finite_difference.eps", self.eps, "must be > 0")

    def check(self, rule, steps: int) -> None:
        if not rule.linear_in_gradient:
            raise MethodError("inner.rule", rule.name, "the finite-difference method needs a last step linear in "
                              "the inner gradient (w - step size * g: sgd, meta_sgd, lslr, momentum)")

    def warnings(self, problem, phi: Params, task, inner) -> list[str]:
        """Where eps sits far outside the range in which a central difference of the inner gradient
        estimates its derivative: above the inner weights' whole norm at their start (the step leaves
        the neighbourhood the last step's second derivatives describe), or a hundred times below the
        square root of the dtype's precision times it (rounding swamps the difference). The margins
        are wide: this names a setting that is far off, not one a tuning would move."""
        if any(value.device.type == "meta" for value in phi.values()):
            return []
        weights = problem.start(detached(phi), task)
        norm = math.sqrt(sum(float((value.detach().double() ** 2).sum()) for value in weights.values()))
        dtype = next(iter(weights.values())).dtype
        if not norm > 0 or not math.isfinite(norm):
            return []
        low, high = 0.01 * math.sqrt(torch.finfo(dtype).eps) * norm, norm
        if low <= self.eps <= high:
            return []
        why = ("the central difference then spans far more than the last step's neighbourhood, and its estimate "
               "is off" if self.eps > high else f"rounding in {str(dtype).removeprefix('torch.')} then swamps the "
               "difference")
        return [f"finite_difference.eps = {self.eps:g} is {self.eps / norm:.3g} times the norm of the inner weights "
                f"at their start ({norm:.4g}): {why}; an eps between {low:.2g} and {high:.2g} suits these weights"]

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None) -> MetaGradient:
        refuse_step_weights(self, step_weights)
        rule, last = inner.rule, inner.steps - 1
        if last < 0:  # no inner step: the outer loss at the start
            weights = start_weights(problem, phi, tasks)
            outer = task_values(problem.outer_loss, weights, phi, tasks)
            return MetaGradient(gradient_sum(outer.sum(), phi), outer.detach(), {}, detached(weights))
        # Every step but the last first order: w keeps the graph of the path (start, step sizes).
        head = unroll(problem, phi, tasks, inner, steps=last, differentiated=0)
        weights, state = head.weights, head.state
        views = step_views(phi, inner.steps, rule)[last]
        constants = detached(phi)

        def inner_grad(point, at_phi, task):
            return grad(lambda w: problem.inner_loss(w, at_phi, task, last))(point)

        gradient = {name: value.requires_grad_() for name, value in
                    vmap(inner_grad, in_dims=(0, None, 0))(detached(weights), constants, tasks).items()}
        final, _ = vmap(rule.step, in_dims=(0, 0, 0, None, None))(weights, gradient, state, views, last)
        outer = task_values(problem.outer_loss, final, phi, tasks)
        v = torch.autograd.grad(outer.sum(), list(final.values()), retain_graph=True)
        # d = a (.) v, read off the rule itself: d w_K / d g = -a.
        step_sizes = torch.autograd.grad(list(final.values()), list(gradient.values()), v, retain_graph=True)
        direction = {name: -value.detach() for name, value in zip(final, step_sizes)}
        norm = task_dot(direction, direction).sqrt()
        moving = norm > 0
        radius = torch.where(moving, self.eps / torch.where(moving, norm, torch.ones_like(norm)),
                             torch.zeros_like(norm))

        def both_grads(point, at_phi, task):
            return grad(lambda w, p: problem.inner_loss(w, p, task, last), argnums=(0, 1))(point, at_phi)

        base = detached(weights)
        plus = vmap(both_grads, in_dims=(0, None, 0))(
            {n: base[n] + per_task(radius, base[n]) * direction[n] for n in base}, constants, tasks)
        minus = vmap(both_grads, in_dims=(0, None, 0))(
            {n: base[n] - per_task(radius, base[n]) * direction[n] for n in base}, constants, tasks)
        # 1 / 2r per task, 0 where d = 0 (no correction to make).
        inverse = torch.where(moving, 0.5 / torch.where(moving, radius, torch.ones_like(radius)),
                              torch.zeros_like(radius))
        hessian_term = {n: -per_task(inverse, plus[0][n]) * (plus[0][n] - minus[0][n]) for n in base}
        mixed_term = {n: -(per_task(inverse, plus[1][n]) * (plus[1][n] - minus[1][n])).sum(0) for n in phi}
        # -H d flows back into w_{K-1} and from there along the first-order path to phi.
        carried = sum((hessian_term[n].detach() * weights[n]).sum() for n in weights)
        grads = gradient_sum(outer.sum() + carried, phi)
        grad_sum = {name: grads[name] + mixed_term[name].detach() for name in phi}
        return MetaGradient(grad_sum, outer.detach(), {}, detached(final))
