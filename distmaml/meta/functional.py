"""The vocabulary of the bi-level core: parameter dicts, tasks as pytrees, a module as a pure function."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A batch of tasks: any pytree (dict, tuple, NamedTuple) of tensors whose leading dimension is the
# task. One task is the same pytree without that dimension (what the problem's functions receive).
Tasks = Any


class TaskBatch(NamedTuple):
    """Support and query sets of n tasks: x is [n, points, *features], y is [n, points, ...].

    The task type of few-shot learning (the MAML problem's); other problems take other pytrees.
    """

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


def num_tasks(tasks: Tasks) -> int:
    """The size of the leading (task) dimension shared by every tensor of `tasks`."""
    leaves = [leaf for leaf in tree_flatten(tasks)[0] if torch.is_tensor(leaf)]
    if not leaves:
        raise ValueError("a batch of tasks must hold at least one tensor")
    return leaves[0].shape[0]


def task_at(tasks: Tasks, i: int) -> Tasks:
    """The i-th task of a batch, without its task dimension."""
    return tree_map(lambda leaf: leaf[i] if torch.is_tensor(leaf) else leaf, tasks)


def tasks_slice(tasks: Tasks, start: int, stop: int) -> Tasks:
    """Tasks start..stop-1 of a batch, keeping the task dimension."""
    return tree_map(lambda leaf: leaf[start:stop] if torch.is_tensor(leaf) else leaf, tasks)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one task: the default loss (the sine family's)."""
    return F.mse_loss(prediction, target)


def functional_forward(model: nn.Module, params: Params, *inputs: torch.Tensor) -> torch.Tensor:
    """model(*inputs) computed with `params` in place of the module's own parameters."""
    return functional_call(model, params, inputs)


def detached(params: Params) -> Params:
    """The same values cut from the graph: the inner loop treats them as constants."""
    return {name: value.detach() for name, value in params.items()}


class MetaGradient(NamedTuple):
    """What one hypergradient computation returns for a process's tasks."""

    grad_sum: Params  # sum over tasks of d objective_i / d phi, for every meta-parameter, in phi's order
    task_losses: torch.Tensor  # [n] outer loss of each task after its last inner step, detached
    stats: dict[str, torch.Tensor]  # the method's diagnostics (e.g. the CG residual), one value per task
    adapted: Params | None = None  # detached inner weights after the last step, task dimension first
    # A method whose own unrolls are the runs' real steps (persistent evolution strategies): each run's
    # state after them, {"weights", "state" (the rule's), "carry" (the method's own)}, task dimension first.
    carried: dict | None = None


class Noise(NamedTuple):
    """Where a stochastic method's perturbations come from: a key (a function of the seed and the outer
    step, an int64 scalar in [0, 2**32)) and each task's global index ([n] int64), so that any shard
    of a batch draws exactly the perturbations one process would have drawn for it."""

    key: torch.Tensor
    index: torch.Tensor
