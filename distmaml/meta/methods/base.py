"""What a hypergradient method is: a small object that turns a problem, a rule and phi into phi's gradient.

    method.hypergradient(problem, phi, tasks, inner)   # -> MetaGradient: SUM over tasks of d L_out / d phi
    method.adapt(problem, phi, tasks, inner, steps)    # the inner loop as evaluation runs it (no graph)
    method.differentiated(K)                           # inner steps whose graph the backward pass keeps
    method.check(rule, steps)                          # refuse a rule it cannot differentiate (one line)
    method.check_problem(problem, phi, task, inner)    # refuse a problem it cannot differentiate
    method.at_steps(k)                                 # the same method as it runs with k inner steps

Every method returns the sum over the batch's tasks, so that shards of a meta-batch add up exactly
across processes; the caller divides by the global meta-batch size. A method owns its typed
settings (its dataclass fields, each with its default and its range check, written once: the config
schema is held to them by tests/meta/test_methods_settings.py; `setting_keys` names each one's
config key), its checks, its diagnostics (`stat_names`, one value per task in MetaGradient.stats),
and what gradcheck holds it to (`reference`, `exact`). The problem never knows
which method differentiates it, and nothing outside distmaml.meta asks which method it holds.

The checks raise MethodError, whose message is "key = value: reason" with the key of the config
setting at fault, so that the command line reports the same line, prefixed with where the value
came from.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from distmaml.errors import SettingError
from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.rules import Rule
from distmaml.meta.unrolling import Unrolled, unroll


class MethodError(SettingError):
    """A rule, problem or setting a method cannot differentiate: "key = value: reason"."""


def at_least(key: str, value: Any, low: float, integer: bool = False) -> None:
    """A setting's range check, in the words the config checks use (NaN fails it)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise MethodError(key, value, "must be an integer")
    if not value >= low:
        raise MethodError(key, value, f"must be >= {low}")


class Method(Protocol):
    name: str
    stat_names: tuple[str, ...]
    # The multi-step loss (an objective over the whole trajectory) needs the unroll's graph.
    trajectory_objective: bool
    # Derivative-order annealing (MAML++) starts first order and switches to a method that
    # differentiates inner steps.
    differentiates_steps: bool
    # gradcheck's reference: "finite_difference" (of the unrolled objective) or "dense_ift".
    reference: str

    def exact(self, steps: int) -> bool:
        """Whether gradcheck should find it equal to its reference at these settings."""

    def differentiated(self, steps: int) -> int: ...

    def check(self, rule: Rule, steps: int) -> None: ...

    def at_steps(self, steps: int) -> "Method":
        """The method as it would run an inner loop of `steps` steps (a memory estimate probes small
        ones): itself, unless a setting is bounded by the steps (truncated mode's truncate)."""

    def check_problem(self, problem: Any, phi: Params, task: Any, inner: Any) -> None: ...

    def hypergradient(self, problem: Any, phi: Params, tasks: Tasks, inner: Any,
                      step_weights: torch.Tensor | None = None) -> MetaGradient: ...

    def adapt(self, problem: Any, phi: Params, tasks: Tasks, inner: Any, steps: int,
              trajectory: bool = False) -> Unrolled: ...


def gradient_sum(objective: torch.Tensor, phi: Params) -> Params:
    """d objective / d phi for every entry of phi (zeros where it does not reach)."""
    if not phi:  # nothing to learn (Learning to Reweight): no gradient to take
        return {}
    if not objective.requires_grad:  # phi reaches the objective only through what the method holds constant
        return {name: torch.zeros_like(value) for name, value in phi.items()}
    grads = torch.autograd.grad(objective, list(phi.values()), allow_unused=True)
    return {name: torch.zeros_like(value) if g is None else g for (name, value), g in zip(phi.items(), grads)}


def plain_adapt(problem: Any, phi: Params, tasks: Tasks, inner: Any, steps: int, trajectory: bool = False) -> Unrolled:
    """The inner loop without a graph: how evaluation adapts under most methods."""
    with torch.no_grad():  # the inner gradients are still taken (inner_gradients enables grad for them)
        return unroll(problem, detached(phi), tasks, inner, steps=steps, differentiated=0, trajectory=trajectory)


class WithoutUnrollGraph:
    """What the methods that keep no graph of the inner steps share (implicit, finite difference,
    Reptile): no multi-step loss, no derivative-order annealing, evaluation adapts plainly, and
    gradcheck holds them to finite differences of the unrolled objective only approximately."""

    stat_names: tuple[str, ...] = ()
    trajectory_objective = False
    differentiates_steps = False
    reference = "finite_difference"
    setting_keys: dict[str, str | None] = {}

    def at_steps(self, steps: int) -> Method:
        return self

    def exact(self, steps: int) -> bool:
        return False

    def differentiated(self, steps: int) -> int:
        return 0

    def check_problem(self, problem: Any, phi: Params, task: Any, inner: Any) -> None:
        pass

    def adapt(self, problem: Any, phi: Params, tasks: Tasks, inner: Any, steps: int,
              trajectory: bool = False) -> Unrolled:
        return plain_adapt(problem, phi, tasks, inner, steps, trajectory)


def refuse_step_weights(method: Method, step_weights: torch.Tensor | None) -> None:
    if step_weights is not None:
        raise MethodError("inner.multi_step_loss", True, f"needs a method that differentiates the unroll, not "
                          f"{method.name}")
