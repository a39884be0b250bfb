"""Hypergradients by autograd through the unroll: second order, truncated, first order.

They differ only in how many of the last inner steps keep their graph (`differentiated`):

    second_order   all K   the exact gradient of the K-step objective (MAML)
    truncated      last T  earlier steps' Jacobians taken as the identity (T = K: second order,
                           T = 0: first order, both identities the tests hold exactly)
    first_order    none    FOMAML: the outer gradient at w_K, carried to phi through the path
                           (start and learned step sizes), not through the inner Hessians

With `step_weights` (MAML++'s multi-step loss) the objective is the weighted sum of the outer loss
after each inner step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.methods.base import MethodError, gradient_sum, plain_adapt
from distmaml.meta.unrolling import task_values, unroll


def unrolled_objective(problem: Any, phi: Params, tasks: Tasks, inner: Any,
                       step_weights: torch.Tensor | None = None,
                       differentiated: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """(objective [n], outer loss after the last step [n], weights after it) of every task, with the
    graph inner.method (or `differentiated`) keeps."""
    result = unroll(problem, phi, tasks, inner, differentiated=differentiated, trajectory=step_weights is not None)
    final = task_values(problem.outer_loss, result.weights, phi, tasks)
    objective = final
    if step_weights is not None and result.trajectory:
        per_step = torch.stack([task_values(problem.outer_loss, point, phi, tasks) for point in result.trajectory])
        objective = (step_weights.to(per_step.dtype)[:, None] * per_step).sum(0)
    return objective, final, result.weights


@dataclass(frozen=True)
class _ThroughUnroll:
    stat_names = ()
    trajectory_objective = True
    reference = "finite_difference"

    def check(self, rule, steps: int) -> None:
        pass

    def check_problem(self, problem, phi, task, inner) -> None:
        pass

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None) -> MetaGradient:
        objective, final, weights = unrolled_objective(problem, phi, tasks, inner, step_weights)
        return MetaGradient(gradient_sum(objective.sum(), phi), final.detach(), {}, detached(weights))

    def adapt(self, problem, phi, tasks, inner, steps, trajectory=False):
        return plain_adapt(problem, phi, tasks, inner, steps, trajectory)


@dataclass(frozen=True)
class SecondOrder(_ThroughUnroll):
    """Backpropagation through every inner step: the exact hypergradient of the unrolled objective."""

    name = "second_order"
    differentiates_steps = True

    def differentiated(self, steps: int) -> int:
        return steps

    def exact(self, steps: int) -> bool:
        return True


@dataclass(frozen=True)
class FirstOrder(_ThroughUnroll):
    """No inner Hessian: FOMAML's meta-gradient (the outer gradient at w_K, through the path)."""

    name = "first_order"
    differentiates_steps = False

    def differentiated(self, steps: int) -> int:
        return 0

    def exact(self, steps: int) -> bool:
        return steps == 0


@dataclass(frozen=True)
class Truncated(_ThroughUnroll):
    """Backpropagation through the last `truncate` inner steps only (Shaban et al. 2019)."""

    truncate: int = 1
    name = "truncated"
    differentiates_steps = True

    def check(self, rule, steps: int) -> None:
        if not 0 <= self.truncate <= steps:
            raise MethodError("inner.truncate", self.truncate, f"must be between 0 and inner.steps ({steps})")

    def differentiated(self, steps: int) -> int:
        return min(self.truncate, steps)

    def exact(self, steps: int) -> bool:
        return self.truncate >= steps
