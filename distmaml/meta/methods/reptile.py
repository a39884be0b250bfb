"""Reptile (Nichol et al. 2018): each task's meta-gradient is phi - w_K, no backward pass at all.

It is not the gradient of an objective; it needs a problem whose inner weights start at phi (MAML's),
and gives learned step sizes no gradient, so a rule that learns them is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.methods.base import MethodError, WithoutUnrollGraph, refuse_step_weights
from distmaml.meta.unrolling import task_values


@dataclass(frozen=True)
class Reptile(WithoutUnrollGraph):
    name = "reptile"

    def check(self, rule, steps: int) -> None:
        if rule.learns:
            raise MethodError("inner.rule", rule.name, "Reptile's meta-gradient phi - w_K gives learned step sizes "
                              "no gradient")

    def check_problem(self, problem, phi: Params, task, inner) -> None:
        start = problem.start(phi, task)
        if not all(name in phi and value is phi[name] for name, value in start.items()):
            raise MethodError("inner.mode", self.name, f"needs a problem whose inner weights start at phi (as "
                              f"MAML's do); {type(problem).__name__} starts them elsewhere")

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None) -> MetaGradient:
        refuse_step_weights(self, step_weights)
        result = self.adapt(problem, phi, tasks, inner, inner.steps)
        with torch.no_grad():
            final = task_values(problem.outer_loss, result.weights, detached(phi), tasks)
            grad_sum = {name: (value.detach() - result.weights[name]).sum(0) if name in result.weights
                        else torch.zeros_like(value) for name, value in phi.items()}
        return MetaGradient(grad_sum, final, {}, result.weights)
