"""Task families. Each samples a batch of tasks as a pure function of (seed, stream, iteration,
global task index), on the training device, task dimension first, so that a shard of a meta-batch
is exactly the slice of the whole batch that a single process would have built."""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def build_task_family(config, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The task family named by config.task.family, ready to sample on `device`."""
    if config.task.family == "sine":
        from distmaml.tasks.sine import SineTasks

        return SineTasks.from_config(config, device=device, dtype=dtype)
    if config.task.family == "omniglot":
        from distmaml.tasks.omniglot import OmniglotTasks

        return OmniglotTasks.from_config(config, device=device, dtype=dtype)
    raise ValueError(f"task.family = {config.task.family!r} is not available")
