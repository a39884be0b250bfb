"""Task families. Each samples a batch of tasks as a pure function of (seed, stream, iteration,
global task index), on the training device, task dimension first, so that a shard of a meta-batch
is exactly the slice of the whole batch that a single process would have built."""

from __future__ import annotations

import torch

from distmaml.meta.functional import TaskBatch  # re-exported: the families build these

__all__ = ["TaskBatch", "build_task_family"]


def build_task_family(config, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The task family named by config.task.family, ready to sample on `device`."""
    if config.task.family == "sine":
        from distmaml.tasks.sine import SineTasks

        return SineTasks.from_config(config, device=device, dtype=dtype)
    if config.task.family == "omniglot":
        from distmaml.tasks.omniglot import OmniglotTasks

        return OmniglotTasks.from_config(config, device=device, dtype=dtype)
    raise ValueError(f"task.family = {config.task.family!r} is not available")
