"""The hypergradient from one entry point: the engine, evaluation, gradcheck and users call these.

    phi = meta_parameters(problem, inner)                   # the problem's entries + learned step sizes
    result = meta_gradient(problem, phi, tasks, inner)      # SUM over tasks of d L_out / d phi

The first call for a (problem, inner) pair also checks, on the batch's first task, that the
method can differentiate the problem (method.check_problem): an unsuitable combination is refused
in one line before any work, not answered with a silently wrong gradient.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from distmaml.meta.functional import MetaGradient, Noise, Params, Tasks, num_tasks, task_at
from distmaml.meta.inner import Inner

_CHECKED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def meta_parameters(problem: Any, inner: Inner) -> dict[str, nn.Parameter]:
    """phi as trainable tensors: the problem's meta-parameters, then the inner rule's learned ones
    (Meta-SGD's and LSLR's step sizes, "inner.lr.<weight>"), sized from the problem's inner weights.
    Parameters the problem already holds (MAML's model weights) are returned as they are."""
    phi = {name: value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach().clone())
           for name, value in problem.meta_parameters().items()}
    learned = inner.rule.parameters({name: value.detach() for name, value in problem.inner_template().items()})
    return {**phi, **{name: nn.Parameter(value) for name, value in learned.items()}}


def check_method(problem: Any, phi: Params, tasks: Tasks, inner: Inner) -> None:
    """Raise MethodError if inner.method cannot differentiate `problem` (checked on the first task)."""
    seen = _CHECKED.setdefault(problem, set())
    if inner in seen or not phi:  # no meta-parameters: nothing for a method to differentiate
        return
    inner.method.check_problem(problem, phi, task_at(tasks, 0), inner)
    seen.add(inner)


def meta_gradient(problem: Any, phi: Params, tasks: Tasks, inner: Inner,
                  step_weights: torch.Tensor | None = None, noise: Noise | None = None) -> MetaGradient:
    """Sum over the batch's tasks of the hypergradient inner.method computes, for every entry of phi.

    `step_weights` ([K], MAML++'s multi-step loss) weights the outer loss after each inner step.
    `noise` is where a stochastic method (evolution strategies: `method.stochastic`) draws its
    perturbations (the trainer's: the seed and the outer step, the tasks' global indices); without
    it such a method draws with key 0 and indices 0..n-1. Other methods draw nothing.
    """
    if num_tasks(tasks) == 0:  # more processes than tasks: this rank only joins the all-reduce
        first = next(iter(phi.values()))
        return MetaGradient({name: torch.zeros_like(value) for name, value in phi.items()},
                            first.new_zeros(0), {name: first.new_zeros(0) for name in inner.method.stat_names})
    check_method(problem, phi, tasks, inner)
    if getattr(inner.method, "stochastic", False):
        return inner.method.hypergradient(problem, phi, tasks, inner, step_weights, noise=noise)
    return inner.method.hypergradient(problem, phi, tasks, inner, step_weights)
