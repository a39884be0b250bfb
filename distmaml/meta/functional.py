"""A module as a pure function of an explicit parameter dict, and the vocabulary of the meta-gradient modes."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MODES = ("second_order", "first_order", "truncated", "implicit", "reptile")


class TaskBatch(NamedTuple):
    """Support and query sets of n tasks: x is [n, points, *features], y is [n, points, ...]."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def task(self, i: int) -> "TaskBatch":
        """The i-th task alone, without its task dimension (for the per-task reference loop)."""
        return TaskBatch(*(t[i] for t in self))

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one task: the default loss (the sine family's)."""
    return F.mse_loss(prediction, target)


def functional_forward(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """model(x) computed with `params` in place of the module's own parameters."""
    return functional_call(model, params, (x,))


def detached(params: Params) -> Params:
    """The same values cut from the graph: the inner loop treats them as constants."""
    return {name: value.detach() for name, value in params.items()}


def differentiated_steps(mode: str, inner_steps: int, truncate: int | None = None) -> int:
    """How many of the last inner steps the meta-gradient backpropagates through.

    The other, earlier steps still move the weights, but their Jacobian is taken as the identity
    (their inner gradients are constants): 0 differentiated steps is first-order MAML, all K is
    full second-order MAML, and truncated mode interpolates between the two. Reptile never
    differentiates its unroll; implicit mode keeps no unroll at all.
    """
    if mode == "second_order":
        return inner_steps
    if mode in ("first_order", "reptile"):
        return 0
    if mode == "truncated":
        if truncate is None or not 0 <= truncate <= inner_steps:
            raise ValueError(f"truncated mode needs 0 <= truncate <= inner_steps ({inner_steps}), got {truncate}")
        return truncate
    if mode == "implicit":
        raise ValueError("mode 'implicit' differentiates no inner steps (its inner loop is regularised towards "
                         "theta and keeps no graph): see distmaml.meta.implicit")
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


class MetaGradient(NamedTuple):
    """What one meta-gradient computation returns for a process's tasks."""

    grad_sum: Params  # sum over tasks of d objective_i / d theta, for every meta-parameter, in theta's order
    task_losses: torch.Tensor  # [n] query loss of each task after its last inner step, detached
    stats: dict[str, torch.Tensor]  # mode-specific diagnostics (e.g. the CG residual), detached
    adapted: Params | None = None  # detached adapted weights, every model weight, task dimension first
