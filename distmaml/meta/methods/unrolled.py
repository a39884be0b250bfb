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
from typing import Any, ClassVar

import torch

from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.methods.base import MethodError, at_least, gradient_sum, plain_adapt
from distmaml.meta.rules import LEARNED
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


def refuse_path_only(method: Any, problem: Any, phi: Params, task: Any) -> None:
    """Refuse a method that differentiates no inner step for a problem some of whose meta-parameters
    reach the outer loss only through the inner steps' gradients (a weight decay, example weights,
    distilled data): their whole hypergradient would be zero by construction. The learned step sizes
    are left out: the path carries their gradient."""
    if any(value.device.type == "meta" for value in phi.values()):
        return  # shapes only: checked again on a real task
    meta = {name: value.detach().requires_grad_(value.is_floating_point()) for name, value in phi.items()}
    probed = [name for name in meta if meta[name].requires_grad and not name.startswith(LEARNED)]
    with torch.enable_grad():
        loss = problem.outer_loss(problem.start(meta, task), meta, task)
        grads = (torch.autograd.grad(loss, [meta[name] for name in probed], allow_unused=True)
                 if loss.requires_grad else [None] * len(probed))
    dropped = [name for name, grad in zip(probed, grads) if grad is None]
    if dropped:
        raise MethodError("inner.mode", method.name, f"differentiates no inner step, and {type(problem).__name__}'s "
                          f"{', '.join(dropped)} {'reaches' if len(dropped) == 1 else 'reach'} the outer loss only through the "
                          "inner steps, so all of its hypergradient would be 0: use second_order, truncated (inner.truncate >= 1), implicit or "
                          "neumann")


@dataclass(frozen=True)
class _ThroughUnroll:
    stat_names = ()
    trajectory_objective = True
    reference = "finite_difference"
    setting_keys: ClassVar[dict[str, str | None]] = {}

    def at_steps(self, steps: int):
        return self

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

    def check_problem(self, problem, phi, task, inner) -> None:
        if inner.steps > 0:  # with none, the trainer's reachability check names inner.steps = 0 instead
            refuse_path_only(self, problem, phi, task)

    def exact(self, steps: int) -> bool:
        return steps == 0


@dataclass(frozen=True)
class Truncated(_ThroughUnroll):
    """Backpropagation through the last `truncate` inner steps only (Shaban et al. 2019)."""

    truncate: int = 1
    name = "truncated"
    differentiates_steps = True
    setting_keys = {"truncate": "inner.truncate"}

    def __post_init__(self) -> None:
        at_least("inner.truncate", self.truncate, 0, integer=True)

    def at_steps(self, steps: int) -> Truncated:
        """With fewer steps than it truncates to, it differentiates all of them (what check() allows)."""
        return Truncated(min(self.truncate, steps))

    def check(self, rule, steps: int) -> None:
        if not 0 <= self.truncate <= steps:
            raise MethodError("inner.truncate", self.truncate, f"must be between 0 and inner.steps ({steps})")

    def differentiated(self, steps: int) -> int:
        return min(self.truncate, steps)

    def check_problem(self, problem, phi, task, inner) -> None:
        if self.differentiated(inner.steps) == 0 and inner.steps > 0:
            refuse_path_only(self, problem, phi, task)

    def exact(self, steps: int) -> bool:
        return self.truncate >= steps
